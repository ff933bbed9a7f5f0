"""The CUDA kernels of torch.ops.lora.*: one per op, choosing Triton or native CUDA.

Rule (also in the README): the op's `backend` argument wins when it is "triton" or
"native"; with "auto", the environment variable LORA_EXT_BACKEND ("triton" / "native")
does; otherwise native, which measured faster at every benchmarked shape on the H200.

- Extension built with CUDA (lora_ext._C.has_cuda()): the CUDA kernels are C++
  (csrc/cuda/lora_cuda.cu), so the native path runs without Python. They reach the
  Triton implementation through the callbacks registered here; without triton
  installed, "triton" falls back to native.
- Extension built without CUDA (CPU-only build used with a CUDA torch): the CUDA
  kernels are registered here, in Python, and always run Triton.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from .. import _C
from ..ops import BACKENDS


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed, found without importing it: importing triton costs ~50 ms
    and `import lora_ext` stays lean (with a CUDA build too); the Triton modules import it on
    their first call."""
    return importlib.util.find_spec("triton") is not None


def native_available() -> bool:
    return _C.has_cuda()


def _triton_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed):
    from . import triton_lora  # imported on first use: `import lora_ext` must not need triton

    return triton_lora.linear_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed)


def _triton_backward(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, output_mask):
    from . import triton_lora

    return triton_lora.linear_backward(
        grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, list(output_mask)
    )


def _triton_lora_function(name: str):
    """triton_lora.<name>, imported on its first call (`import lora_ext` must not need triton)."""

    def call(*args):
        from . import triton_lora

        return getattr(triton_lora, name)(*args)

    call.__name__ = name
    return call


def _fused_or_none(run, device_of):
    """run() on device_of's device, or None where the compiled kernel does not fit this GPU
    (shared memory, registers): the caller then composes cuBLAS calls, as for refused layouts,
    and the key stays declined (csrc/lora.cpp run_piece)."""
    from . import fused_forward, triton_lora

    with triton_lora.device_guard(device_of):
        return fused_forward.unless_out_of_resources(run)


def fused_forward_callback(x2, weight, bias, lora_A, lora_B, scale, post_dropout_p=0.0, seed=None):
    """The native path's fused forward (csrc/lora_aten.cpp, use_fused_forward: dropout 0;
    use_fused_post_dropout_forward: 'post' dropout with p = post_dropout_p and its seed): (y, xa), or None
    where fused_forward.supports refuses these tensors (C++ then composes cuBLAS calls)."""
    from . import fused_forward  # imported on first use, as in the callbacks above

    if not fused_forward.supports(x2, weight, bias, lora_A, lora_B):
        return None
    return _fused_or_none(
        lambda: fused_forward.linear_forward(x2, weight, bias, lora_A, lora_B, scale, post_dropout_p, seed), x2)


def fused_grad_input_callback(grad_y2, weight, lora_A, lora_B, scale):
    """The native path's fused input gradient (csrc/lora_aten.cpp, use_fused_grad_input; dropout 0):
    (dx, s g B), or None where fused_forward.grad_input_supports refuses these tensors."""
    from . import fused_forward

    if not fused_forward.grad_input_supports(grad_y2, weight, lora_A, lora_B):
        return None
    return _fused_or_none(lambda: fused_forward.grad_input(grad_y2, weight, lora_A, lora_B, scale), grad_y2)


def fused_grad_input_given_xa_callback(grad_y2, weight, lora_A, lora_B, grad_xa):
    """The native path's input gradient with grad_xa given (csrc/lora_aten.cpp: with 'post' dropout,
    use_fused_post_dropout_grad_input, grad_xa = s drop(g) B from the masked step; without dropout,
    fused_grad_input_given and past r = 16, grad_xa = s g B, formed for dA anyway): (dx,) =
    (g W + grad_xa A,), or None where fused_forward.grad_input_given_xa_supports refuses these tensors."""
    from . import fused_forward

    if not fused_forward.grad_input_given_xa_supports(grad_y2, weight, lora_A, lora_B, grad_xa):
        return None
    return _fused_or_none(
        lambda: (fused_forward.grad_input_given_xa(grad_y2, weight, lora_A, lora_B, grad_xa),), grad_y2)


def _measured_gpu(t) -> bool:
    """Hopper or newer: the one launch was measured (and chosen, benchmarks/NOTES.md #39) on the H200
    only; elsewhere cuBLAS stays, and no compile of an untried kernel can fail a backward."""
    from . import device_facts

    return t.is_cuda and device_facts.major_capability(t.device) >= 9


def adapter_grads_callback(grad_xa, x2, xa, grad_y2, scale_A, scale_B):
    """The native path's adapter gradients in one launch (csrc/lora_aten.cpp, use_fused_adapter_grads;
    dropout 0): (dA, dB), or None off Hopper or where adapter_grads.supported refuses these tensors."""
    from . import adapter_grads

    if not (_measured_gpu(x2) and adapter_grads.supported(grad_xa, x2, xa, grad_y2)):
        return None
    return _fused_or_none(lambda: adapter_grads.adapter_grads(grad_xa, x2, xa, grad_y2, scale_A, scale_B), x2)


def grad_A_only_callback(grad_xa, x2, scale_A):
    """The native path's dA alone in one launch (csrc/lora_aten.cpp, use_fused_adapter_grads, where dB
    comes from the 'post' dropout backward's masked step or is not wanted): (dA,), or None off Hopper
    or where adapter_grads.supported refuses these tensors."""
    from . import adapter_grads

    if not (_measured_gpu(x2) and adapter_grads.supported(grad_xa, x2, grad_xa, x2)):
        return None
    return _fused_or_none(lambda: (adapter_grads.grad_A_only(grad_xa, x2, scale_A),), x2)


def grad_B_only_callback(xa, grad_y2, scale_B):
    """The native path's dB alone in one launch (csrc/lora_aten.cpp, split_adapter_grads_for_memory: dA
    and dB apart, grad_xa freed between): (dB,), or None off Hopper or where adapter_grads.supported
    refuses these tensors."""
    from . import adapter_grads

    if not (_measured_gpu(grad_y2) and adapter_grads.supported(xa, grad_y2, xa, grad_y2)):
        return None
    return _fused_or_none(lambda: (adapter_grads.grad_B_only(xa, grad_y2, scale_B),), grad_y2)


if native_available():
    if triton_available():
        _C.set_triton_kernels(_triton_forward, _triton_backward)
        # The native path's dropout steps (triton_lora.masked_*), and the recorder whose
        # recipes C++ replays without Python (replay.py).
        from . import replay

        # The forward and input gradient of k/v-sized layers (and of wider ones with K <= 2048 by
        # csrc/lora_aten.cpp's rules) as one Triton GEMM each
        # (fused_forward.py: dropout-free, and with 'post' dropout), and the adapter gradients
        # in one launch (adapter_grads.py: both, or each alone).
        _C.set_triton_fused_gemms(fused_forward_callback, fused_grad_input_callback, adapter_grads_callback,
                                  fused_grad_input_given_xa_callback, grad_A_only_callback, grad_B_only_callback)
        _C.set_triton_masked_pieces(
            *(_triton_lora_function(name) for name in ("masked_down", "masked_grad_y", "masked_up")), replay.record
        )
else:

    def _require_triton(backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"lora: backend must be one of {BACKENDS}, got '{backend}'")
        if not triton_available():
            raise RuntimeError(
                "lora: CUDA tensors need triton or lora_ext built with CUDA (see README: Build options); "
                "neither is available"
            )

    @torch.library.register_kernel("lora::linear", "cuda")
    def _linear_cuda(
        x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, dropout_position="post", seed=None, backend="auto"
    ):
        _require_triton(backend)
        return _triton_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed)

    @torch.library.register_kernel("lora::linear_backward", "cuda")
    def _linear_backward_cuda(
        grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, output_mask, backend="auto"
    ):
        _require_triton(backend)
        return _triton_backward(
            grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, output_mask
        )

