"""The CUDA kernels of torch.ops.lora.*: one per op, choosing Triton or native CUDA.

Rule (documented in the README): the op's `backend` argument wins when it is
"triton" or "native"; with "auto", the environment variable LORA_EXT_BACKEND
("triton" / "native") wins; otherwise `choose_backend` picks by shape class.
"native" needs the extension built with CUDA (lora_ext._C.has_cuda()); "triton"
needs the triton package. When only one is available, it is used.
"""
from __future__ import annotations

import functools
import os

import torch

from .. import _C


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def native_available() -> bool:
    return _C.has_cuda()


def choose_backend(requested: str, M: int, N: int, K: int) -> str:
    """Which implementation runs a CUDA call (see the module docstring)."""
    if requested == "auto":
        requested = os.environ.get("LORA_EXT_BACKEND", "auto")
    if requested not in ("auto", "triton", "native"):
        raise ValueError(f"lora: backend / LORA_EXT_BACKEND must be auto, triton or native, got '{requested}'")
    if requested == "auto":
        requested = "triton"
    if requested == "triton" and not triton_available():
        if not native_available():
            raise RuntimeError("lora: CUDA tensors need triton or lora_ext built with CUDA; neither is available")
        return "native"
    if requested == "native" and not native_available():
        if not triton_available():
            raise RuntimeError("lora: CUDA tensors need triton or lora_ext built with CUDA; neither is available")
        return "triton"
    return requested


@torch.library.register_kernel("lora::linear", "cuda")
def _linear_cuda(
    x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, dropout_position="post", seed=None, backend="auto"
):
    K = x.shape[-1]
    N = lora_B.shape[0]
    M = x.numel() // max(K, 1)
    if choose_backend(backend, M, N, K) == "native":
        return _C.linear_forward_native(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed)
    from . import triton_lora

    return triton_lora.linear_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed)


@torch.library.register_kernel("lora::linear_backward", "cuda")
def _linear_backward_cuda(
    grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, output_mask, backend="auto"
):
    K = x.shape[-1]
    N = lora_B.shape[0]
    M = xa.shape[0]
    if choose_backend(backend, M, N, K) == "native":
        return _C.linear_backward_native(
            grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, list(output_mask)
        )
    from . import triton_lora

    return triton_lora.linear_backward(
        grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, list(output_mask)
    )
