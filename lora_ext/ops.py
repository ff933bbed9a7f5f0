"""Python side of the lora ops: typed wrappers and fake kernels (autograd: csrc/lora_autograd.cpp).

The schemas live in csrc/lora.cpp; the CPU kernels in csrc/lora_cpu.cpp; the CUDA
kernels are registered in lora_ext/kernels/cuda_dispatch.py.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DROPOUT_POSITIONS = ("pre", "post")
BACKENDS = ("auto", "triton", "native")
# Inclusive upper bound of the seeds the Python wrapper draws.
_SEED_HIGH = 2**62


_LINEAR = torch.ops.lora.linear.default


def draw_seed(device: torch.device) -> Tensor:
    """A fresh dropout seed from torch's generator on `device`.

    Drawn with torch.randint so that torch.manual_seed reproduces a run, CUDA graphs
    can capture it, and torch.compile traces it as a graph input (no recompiles).
    """
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    dropout_position: str = "post",
    seed: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """y = x W^T + b + LoRA(x) through torch.ops.lora.linear (see SPEC.md section 1).

    When dropout_p > 0 and no seed is given, one is drawn from torch's generator.
    """
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    # The overload itself: resolving the packet torch.ops.lora.linear costs host time per call.
    y, _ = _LINEAR(x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), dropout_position, seed, backend)
    return y


# ---------------------------------------------------------------------------
# Argument checks for the fake kernels. They mirror csrc/checks.h so that meta and
# fake tensors get the same messages as real ones.
# ---------------------------------------------------------------------------


def _check_floating(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lora: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_same_device(t: Tensor, x: Tensor, name: str, x_name: str = "x") -> None:
    if t.device != x.device:
        raise RuntimeError(
            f"lora: {name} is on {t.device} but {x_name} is on {x.device}; all tensors must be on one device"
        )


def _check_seed(seed: Tensor, ref: Tensor, ref_name: str) -> None:
    """The dropout seed: one int64 on the device of ref (x, or lora::post_dropout_grad_y's grad_y)."""
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(
            f"lora: seed must be an int64 tensor with one element, got {seed.dtype} of shape {tuple(seed.shape)}"
        )
    _check_same_device(seed, ref, "seed", ref_name)


def check_scale(scale, x: Tensor, lora_A: Tensor) -> None:
    """A non-finite scale (alpha = inf or nan) is refused: it can only give garbage; so is one past
    the range of x's or the adapters' dtype, where some paths would turn it into inf (csrc/checks.h)."""
    if not math.isfinite(scale):
        raise ValueError(f"lora: scale must be a finite number, got {scale}")
    narrow = min((x.dtype, lora_A.dtype), key=lambda d: torch.finfo(d).max)
    limit = torch.finfo(narrow).max
    if abs(scale) > limit:
        raise ValueError(f"lora: scale {scale:g} is beyond the range of {narrow} (largest finite value {limit:g}), "
                         f"the dtype of x or the adapters")


def check_linear_backward_args(grad_y, x, xa, lora_A, weight, output_mask, M, N, r, xa_name="xa") -> None:
    """lora::linear_backward's own arguments, after check_linear_args (mirrors csrc/checks.h).
    xa_name: the (M, r) argument's name in the messages (lora::linear_backward_from_grad_xa's is grad_xa)."""
    torch._check(
        grad_y.dim() >= 1 and grad_y.shape[-1] == N and grad_y.numel() == M * N,
        lambda: f"lora: grad_y must have shape (..., {N}) with {M} rows, got {tuple(grad_y.shape)}",
    )
    if grad_y.dtype != x.dtype:
        raise TypeError(f"lora: grad_y dtype ({grad_y.dtype}) must equal x dtype ({x.dtype})")
    _check_same_device(grad_y, x, "grad_y")
    torch._check(
        xa.dim() == 2 and xa.shape[0] == M and xa.shape[1] == r,
        lambda: f"lora: {xa_name} must have shape ({M}, {r}), got {tuple(xa.shape)}",
    )
    if xa.dtype != lora_A.dtype:
        raise TypeError(f"lora: {xa_name} dtype ({xa.dtype}) must equal lora_A dtype ({lora_A.dtype})")
    _check_same_device(xa, x, xa_name)
    if len(output_mask) != 5:
        raise RuntimeError("lora: output_mask must have 5 entries")
    if output_mask[1] and weight is None:
        raise RuntimeError("lora: grad of weight requested but weight is None")


def check_post_dropout_grad_y_args(grad_y, lora_B, xa, dropout_p, seed, partial_bytes_cap):
    """lora::post_dropout_grad_y's arguments (mirrors csrc/checks.h); returns (M, N, r)."""
    _check_floating(grad_y, "grad_y")
    _check_floating(lora_B, "lora_B")
    if grad_y.dim() < 1:
        raise RuntimeError("lora: grad_y must have at least 1 dimension (..., out_features), got a 0-dim tensor")
    if lora_B.dim() != 2:
        raise RuntimeError(f"lora: lora_B must be 2-D (out_features, r), got shape {tuple(lora_B.shape)}")
    N, r = lora_B.shape
    M = math.prod(grad_y.shape[:-1])
    torch._check(r >= 1, lambda: f"lora: rank must be >= 1, got lora_B of shape {tuple(lora_B.shape)}")
    torch._check(
        grad_y.shape[-1] == N,
        lambda: f"lora: grad_y must have shape (..., out_features={N}) to match lora_B of shape "
        f"{tuple(lora_B.shape)}, got {tuple(grad_y.shape)}",
    )
    _check_same_device(lora_B, grad_y, "lora_B", "grad_y")
    torch._check(
        xa.dim() == 2 and xa.shape[0] == M and xa.shape[1] == r,
        lambda: f"lora: xa must have shape ({M}, {r}), got {tuple(xa.shape)}",
    )
    if xa.dtype != lora_B.dtype:
        raise TypeError(f"lora: xa dtype ({xa.dtype}) must equal lora_B dtype ({lora_B.dtype})")
    _check_same_device(xa, grad_y, "xa", "grad_y")
    if not (0.0 < dropout_p < 1.0):
        raise ValueError(f"lora: dropout_p must be in (0, 1), got {dropout_p}")
    _check_seed(seed, grad_y, "grad_y")
    torch._check_value(partial_bytes_cap >= 0, lambda: f"lora: partial_bytes_cap must be >= 0, got {partial_bytes_cap}")
    return M, N, r


def check_linear_args(x, weight, bias, lora_A, lora_B, dropout_p, dropout_position, seed, backend):
    """Validates lora::linear's arguments; returns (M, K, N, r)."""
    if dropout_position not in DROPOUT_POSITIONS:
        raise ValueError(f"lora: dropout_position must be 'pre' or 'post', got '{dropout_position}'")
    if backend not in BACKENDS:
        raise ValueError(f"lora: backend must be one of {BACKENDS}, got '{backend}'")
    if x.dim() < 1:
        raise RuntimeError("lora: x must have at least 1 dimension (..., in_features), got a 0-dim tensor")
    _check_floating(x, "x")
    _check_floating(lora_A, "lora_A")
    _check_floating(lora_B, "lora_B")
    if lora_A.dim() != 2:
        raise RuntimeError(f"lora: lora_A must be 2-D (r, in_features), got shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 2:
        raise RuntimeError(f"lora: lora_B must be 2-D (out_features, r), got shape {tuple(lora_B.shape)}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must have the same dtype")
    _check_same_device(lora_A, x, "lora_A")
    _check_same_device(lora_B, x, "lora_B")
    K = x.shape[-1]
    r = lora_A.shape[0]
    M = math.prod(x.shape[:-1])
    torch._check(r >= 1, lambda: f"lora: rank must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    torch._check(
        lora_A.shape[1] == K,
        lambda: f"lora: lora_A.shape[1] must equal x.shape[-1] (in_features={K}), got lora_A of shape "
        f"{tuple(lora_A.shape)} and x of shape {tuple(x.shape)}",
    )
    if weight is not None:
        _check_floating(weight, "weight")
        _check_same_device(weight, x, "weight")
        if weight.dim() != 2:
            raise RuntimeError(
                f"lora: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
            )
        torch._check(
            weight.shape[1] == K,
            lambda: f"lora: weight.shape[1] must equal x.shape[-1] ({K}), got weight of shape "
            f"{tuple(weight.shape)} and x of shape {tuple(x.shape)}",
        )
        if weight.dtype != x.dtype:
            raise TypeError(f"lora: weight dtype ({weight.dtype}) must equal x dtype ({x.dtype})")
        N = weight.shape[0]
    else:
        N = lora_B.shape[0]
    torch._check(
        lora_B.shape[0] == N and lora_B.shape[1] == r,
        lambda: f"lora: lora_B must have shape (out_features={N}, r={r}), got {tuple(lora_B.shape)}",
    )
    if bias is not None:
        _check_same_device(bias, x, "bias")
        if bias.dtype != x.dtype:
            raise TypeError(f"lora: bias dtype ({bias.dtype}) must equal x dtype ({x.dtype})")
        torch._check(
            bias.dim() == 1 and bias.shape[0] == N,
            lambda: f"lora: bias must have shape (out_features={N},), got {tuple(bias.shape)}",
        )
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"lora: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and seed is None:
        raise RuntimeError(f"lora: dropout_p={dropout_p} > 0 needs a seed tensor, got None")
    if seed is not None:
        _check_seed(seed, x, "x")
    return M, K, N, r


@torch.library.register_fake("lora::linear")
def _linear_fake(
    x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, dropout_position="post", seed=None, backend="auto"
):
    M, K, N, r = check_linear_args(x, weight, bias, lora_A, lora_B, dropout_p, dropout_position, seed, backend)
    check_scale(scale, x, lora_A)
    y = x.new_empty(*x.shape[:-1], N)
    xa = lora_A.new_empty(M, r)
    return y, xa


def _grad_or_empty(needed: bool, like: Tensor, shape) -> Tensor:
    """A backward op's output: shaped as the gradient where wanted, else the empty (0,) tensor the kernels return."""
    return like.new_empty(shape) if needed else like.new_empty(0)


@torch.library.register_fake("lora::linear_backward")
def _linear_backward_fake(
    grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, output_mask, backend="auto"
):
    M, K, N, r = check_linear_args(x, weight, None, lora_A, lora_B, dropout_p, dropout_position, seed, backend)
    check_scale(scale, x, lora_A)
    check_linear_backward_args(grad_y, x, xa, lora_A, weight, output_mask, M, N, r)
    need_x, need_weight, need_bias, need_A, need_B = output_mask
    return (
        _grad_or_empty(need_x, x, x.shape),
        _grad_or_empty(need_weight, x, (N, K)),
        _grad_or_empty(need_bias, x, (N,)),
        _grad_or_empty(need_A, lora_A, (r, K)),
        _grad_or_empty(need_B, lora_B, (N, r)),
    )


@torch.library.register_fake("lora::post_dropout_grad_y")
def _post_dropout_grad_y_fake(grad_y, lora_B, xa, scale, dropout_p, seed, output_mask, partial_bytes_cap=0):
    M, N, r = check_post_dropout_grad_y_args(grad_y, lora_B, xa, dropout_p, seed, partial_bytes_cap)
    check_scale(scale, grad_y, lora_B)
    if len(output_mask) != 2:
        raise RuntimeError("lora: output_mask must have 2 entries")
    need_grad_xa, need_B = output_mask
    return _grad_or_empty(need_grad_xa, xa, (M, r)), _grad_or_empty(need_B, lora_B, (N, r))


@torch.library.register_fake("lora::linear_backward_from_grad_xa")
def _linear_backward_from_grad_xa_fake(grad_y, x, weight, lora_A, lora_B, grad_xa, output_mask):
    M, K, N, r = check_linear_args(x, weight, None, lora_A, lora_B, 0.0, "post", None, "auto")
    if len(output_mask) != 4:
        raise RuntimeError("lora: output_mask must have 4 entries")
    need_x, need_weight, need_bias, need_A = output_mask
    check_linear_backward_args(grad_y, x, grad_xa, lora_A, weight, [need_x, need_weight, need_bias, need_A, False],
                               M, N, r, xa_name="grad_xa")
    return (
        _grad_or_empty(need_x, x, x.shape),
        _grad_or_empty(need_weight, x, (N, K)),
        _grad_or_empty(need_bias, x, (N,)),
        _grad_or_empty(need_A, lora_A, (r, K)),
    )


# Autograd of the ops is C++ (csrc/lora_autograd.cpp): lora::linear saves x, weight, the
# adapters, xa (M x r) and the seed; lora::linear_backward regenerates the dropout mask (with
# 'post' dropout, where the graph is not kept, as its two halves: lora::post_dropout_grad_y and
# lora::linear_backward_from_grad_xa, xa released between them).


def linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scale: float,
    dropout_p: float,
    dropout_position: str,
    seed: Optional[Tensor],
    output_mask: Sequence[bool],
    backend: str = "auto",
):
    """Typed wrapper of torch.ops.lora.linear_backward; returns (dx, dW, db, dA, dB), None where not asked."""
    grads = torch.ops.lora.linear_backward(
        grad_y, x, weight, lora_A, lora_B, xa, float(scale), float(dropout_p), dropout_position, seed,
        list(output_mask), backend,
    )
    return tuple(g if needed else None for g, needed in zip(grads, output_mask))
