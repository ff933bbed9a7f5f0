"""Random lora::linear problems for the hypothesis tests, and the float64 error bound they use.

Shared by tests/test_fuzz.py (CPU and CUDA) and tests/_triton_interpret_fuzz.py (the
Triton kernels under triton's interpreter). Not collected by pytest (no test_ prefix).

A problem is drawn as a plain description (`Problem`: sizes, dtypes, memory layouts,
which tensors require grad, dropout, seed); `Problem.build(device)` makes its tensors
from a torch.Generator seeded by the description, so a failing example printed by
hypothesis rebuilds the same tensors.

The error bound is elementwise and scales with the dtype (see `assert_within_bound`):
the float64 reference evaluated on |inputs| gives, for every output element, the sum of
the magnitudes of the terms that make it; a correct kernel's rounding error is a small
multiple of the unit roundoff times that sum.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
from hypothesis import strategies as st

from lora_ext.reference import dropout_keep_mask, lora_linear_reference

Tensor = torch.Tensor

TENSOR_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")

# 0, 1, small primes, and sizes around the kernels' block sizes (32/64/128): one below,
# at and one or three above, so that partial last blocks and exact multiples both occur.
SIZES = (0, 1, 2, 3, 5, 7, 13, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 131)
RANKS_SMALL = (1, 2, 3, 4, 7, 8, 16, 17)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")

FUZZ_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The same examples on every run (CI must not pass or fail by luck); LORA_FUZZ_RANDOM=1 draws
# new ones each run, for exploring (a failure prints the example to reproduce it).
DERANDOMIZE = os.environ.get("LORA_FUZZ_RANDOM", "0") != "1"


def fuzz_examples(default: int) -> int:
    """Number of hypothesis examples: `default` times the LORA_FUZZ_EXAMPLES factor.

    LORA_FUZZ_EXAMPLES (default 1) scales every fuzz test, e.g. LORA_FUZZ_EXAMPLES=20 on
    the GPU machine. It may be a float (0.2 for a quick smoke run).
    """
    factor = float(os.environ.get("LORA_FUZZ_EXAMPLES", "1"))
    return max(1, int(round(default * factor)))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One call of lora::linear, described by plain values (hypothesis prints it on failure)."""

    leading: tuple  # x is leading + (K,)
    K: int
    N: int
    r: int
    dtype: torch.dtype  # x, weight and bias
    lora_dtype: torch.dtype  # lora_A and lora_B
    has_weight: bool
    has_bias: bool
    layouts: tuple  # one entry of LAYOUTS per TENSOR_NAMES entry
    expanded_dims: tuple  # per tensor: the dims broadcast (stride 0) when its layout is "expanded"
    requires_grad: tuple  # per tensor
    scale: float
    dropout_p: float
    dropout_position: str
    seed: int
    data_seed: int

    @property
    def M(self) -> int:
        return math.prod(self.leading)

    def shapes(self) -> dict:
        return dict(
            x=(*self.leading, self.K), weight=(self.N, self.K), bias=(self.N,),
            lora_A=(self.r, self.K), lora_B=(self.N, self.r),
        )

    def present(self, name: str) -> bool:
        return (name != "weight" or self.has_weight) and (name != "bias" or self.has_bias)

    def build(self, device) -> dict:
        """The tensors of this problem on `device`, in their layouts, or None where absent.

        Each tensor is a view of a random leaf (the leaf requires grad when the problem
        says so); gradients are taken with respect to the view. Values are random
        normals (none zero), with std 1/sqrt(K) for weight and lora_A so that outputs
        stay O(1) whatever K is.
        """
        gen = torch.Generator().manual_seed(self.data_seed)
        shapes = self.shapes()
        dtypes = dict(x=self.dtype, weight=self.dtype, bias=self.dtype, lora_A=self.lora_dtype,
                      lora_B=self.lora_dtype)
        std = dict(x=1.0, weight=max(self.K, 1) ** -0.5, bias=1.0, lora_A=max(self.K, 1) ** -0.5,
                   lora_B=max(self.r, 1) ** -0.5)
        tensors = {}
        for i, name in enumerate(TENSOR_NAMES):
            if not self.present(name):
                tensors[name] = None
                continue
            tensors[name] = _strided_tensor(
                shapes[name], dtypes[name], self.layouts[i], self.expanded_dims[i], std[name], gen, device,
                self.requires_grad[i],
            )
        tensors["seed"] = (
            torch.tensor([self.seed], dtype=torch.int64, device=device) if self.dropout_p > 0 else None
        )
        return tensors

    def op_args(self, t: dict, backend: str = "auto") -> tuple:
        return (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], self.scale, self.dropout_p,
                self.dropout_position, t["seed"], backend)

    def lowest_precision(self) -> torch.dtype:
        return max((self.dtype, self.lora_dtype), key=lambda dt: torch.finfo(dt).eps)


def _strided_tensor(shape, dtype, layout, expanded_dims, std, gen, device, requires_grad) -> Tensor:
    """A `shape` tensor with the given memory layout, viewed from a random leaf."""
    ndim = len(shape)
    if layout == "transposed" and ndim < 2:
        layout = "sliced"  # a 1-D tensor has nothing to transpose; a step of 2 is the next best

    def leaf(leaf_shape):
        values = torch.randn(leaf_shape, generator=gen, dtype=torch.float64) * std
        return values.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    if layout == "contiguous":
        return leaf(shape)
    if layout == "transposed":  # last two dims swapped: the last dim has stride != 1
        return leaf((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "sliced":  # every other element of every dim, from an offset of 1
        big = leaf(tuple(2 * s + 1 for s in shape))
        return big[tuple(slice(1, 1 + 2 * s, 2) for s in shape)]
    if layout == "expanded":  # the chosen dims have stride 0: one value repeated along them
        small_shape = tuple(1 if d in expanded_dims else s for d, s in enumerate(shape))
        return leaf(small_shape).expand(shape)
    raise AssertionError(layout)


@st.composite
def problems(draw, *, budget: int = 40_000, sizes=SIZES, dtypes=FUZZ_DTYPES, max_rank: int = 256) -> Problem:
    """A random Problem whose tensors hold at most about `budget` elements in all.

    K and N are drawn from `sizes`, and so is each of x's leading dimensions.

    Budget: M*K + M*N + N*K + r*(K+N) <= budget (M is cut down to fit), so that the
    float64 reference and its gradients stay fast.
    """
    K = draw(st.sampled_from(sizes), label="K")
    N = draw(st.sampled_from([n for n in sizes if n * K <= budget // 2]), label="N")
    # Any rank >= 1 is valid, also above min(K, N): the product is then simply rank-deficient.
    r = draw(st.one_of(st.sampled_from(RANKS_SMALL), st.integers(1, max_rank)), label="r")
    max_m = max(1, (budget - N * K - r * (K + N)) // max(K + N, 1))
    leading = ()
    for _ in range(draw(st.integers(0, 3), label="leading dims")):
        prod = math.prod(leading)
        allowed = [s for s in sizes if s * prod <= max_m]
        leading += (draw(st.sampled_from(allowed)),)
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    lora_dtype = draw(st.one_of(st.just(dtype), st.sampled_from(dtypes)), label="lora_dtype")
    has_weight = draw(st.booleans(), label="has_weight")
    has_bias = draw(st.booleans(), label="has_bias")
    ndims = dict(x=len(leading) + 1, weight=2, bias=1, lora_A=2, lora_B=2)
    layouts, expanded_dims, requires_grad = [], [], []
    for name in TENSOR_NAMES:
        # Mostly contiguous (the common case), else one of the others.
        layouts.append(draw(st.one_of(st.just("contiguous"), st.sampled_from(LAYOUTS)), label=f"{name} layout"))
        dims = range(ndims[name])
        expanded_dims.append(tuple(d for d in dims if draw(st.booleans(), label=f"{name} expand dim {d}")))
        requires_grad.append(draw(st.booleans(), label=f"{name} requires_grad"))
    scale = draw(st.one_of(st.sampled_from([1.0, 2.0, -0.5, 0.0]), st.floats(-4.0, 4.0)), label="scale")
    # p up to 0.95: with 1/(1-p) = 20 the dropped-out values still fit float16.
    dropout_p = draw(st.one_of(st.just(0.0), st.sampled_from([0.1, 0.5, 0.9]), st.floats(0.0, 0.95)),
                     label="dropout_p")
    return Problem(
        leading=leading, K=K, N=N, r=r, dtype=dtype, lora_dtype=lora_dtype, has_weight=has_weight,
        has_bias=has_bias, layouts=tuple(layouts), expanded_dims=tuple(expanded_dims),
        requires_grad=tuple(requires_grad), scale=scale, dropout_p=dropout_p,
        dropout_position=draw(st.sampled_from(["pre", "post"]), label="position"),
        seed=draw(st.integers(-(2**63), 2**63 - 1), label="seed"),
        data_seed=draw(st.integers(0, 2**32 - 1), label="data_seed"),
    )


# ---------------------------------------------------------------------------
# Reference, magnitudes and the bound
# ---------------------------------------------------------------------------

# Roundings to storage precision a correct kernel may make on the way to one output
# element: inputs cast to the adapters' dtype, x A^T stored, the LoRA term stored and
# scaled by dropout, the sum stored (forward); the same number again for each gradient.
STORAGE_ROUNDINGS = 8
# Accumulation is float32 (or better) in every backend; a dot product of length L
# errs by at most L float32 units times the magnitude (the classic bound, not sqrt(L)).
FLOAT32_UNIT = 2.0**-24


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def reference_outputs(problem: Problem, tensors: dict, grad_y: Optional[Tensor], *, absolute: bool) -> tuple:
    """(y, xa, grads by name) of the float64 reference; with absolute=True, of |inputs|.

    With |inputs|, |scale| and |grad_y|, every term of every sum is non-negative, so the
    results are the elementwise sums of magnitudes that bound rounding errors.
    """
    leaves = {}
    for name in TENSOR_NAMES:
        t = tensors[name]
        if t is None:
            continue
        t = t.detach().to(dtype=torch.float64, copy=True)
        leaves[name] = (t.abs() if absolute else t).requires_grad_()
    scale = abs(problem.scale) if absolute else problem.scale
    seed = problem.seed if problem.dropout_p > 0 else None
    y = lora_linear_reference(leaves["x"], leaves.get("weight"), leaves.get("bias"), leaves["lora_A"],
                              leaves["lora_B"], scale, problem.dropout_p, problem.dropout_position, seed)
    # xa = drop_pre(x) A^T, unscaled (the op's second output).
    x2 = leaves["x"].detach().reshape(problem.M, problem.K)
    if problem.dropout_p > 0 and problem.dropout_position == "pre":
        keep = dropout_keep_mask(seed, problem.M, problem.K, problem.dropout_p)
        x2 = x2 * keep.to(device=x2.device, dtype=torch.float64) / (1 - problem.dropout_p)
    xa = x2 @ leaves["lora_A"].detach().t()
    grads = {}
    if grad_y is not None and y.numel() > 0:
        g = grad_y.detach().to(torch.float64)
        names = list(leaves)
        values = torch.autograd.grad(y, [leaves[n] for n in names], g.abs() if absolute else g, allow_unused=True)
        grads = {n: (v if v is not None else torch.zeros_like(leaves[n])) for n, v in zip(names, values)}
    elif grad_y is not None:
        grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
    return y.detach(), xa, grads


def subnormal_loss(dtype: torch.dtype, device: torch.device) -> float:
    """What one rounding can lose near zero in `dtype`: one subnormal step, or on CPU in bfloat16 the
    whole subnormal range, as torch's CPU bf16 GEMM (oneDNN, taken from some size up) flushes
    subnormal inputs and results to zero: torch.addmm of 4192 x 1 bf16 rows flushed 4186 of 4192
    subnormal results (100 rows: none; float16 and float32: none). Found by the randomized fuzz
    (LORA_FUZZ_RANDOM=1, scale 1.2e-38); the op calls at::mm there, as PEFT's layer would."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        return torch.finfo(dtype).tiny
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def intermediate_underflow_floors(problem: Problem, tensors: dict, grad_y: Tensor) -> dict:
    """Absolute error floors (float64, by output name) from the rank-r intermediates underflowing.

    xa = x A^T and dxa = s dY B are stored in the adapters' dtype; where their true values lie
    below its subnormal range (fp16: 6e-8; e.g. a scale of 1e-9) each element may lose up to one
    subnormal step, and that error reaches the outputs multiplied by the other operand:
    y[m, n] by |s| sum_j |B[n, j]|, dB[n, j] by |s| sum_m |dY[m, n]|, dA[j, k] by sum_m |x[m, k]|,
    dx[m, k] by sum_j |A[j, k]| (times 1 / (1 - p) for 'pre' dropout's scaling of x).
    """
    if problem.lora_dtype == torch.float64:
        return {}
    step = subnormal_loss(problem.lora_dtype, tensors["x"].device)
    keep_scale = 1.0 / (1.0 - problem.dropout_p) if problem.dropout_position == "pre" else 1.0
    x = tensors["x"].detach().to(torch.float64).reshape(problem.M, problem.K).abs() * keep_scale
    A = tensors["lora_A"].detach().to(torch.float64).abs()
    B = tensors["lora_B"].detach().to(torch.float64).abs()
    g = grad_y.detach().to(torch.float64).reshape(problem.M, problem.N).abs()
    post_scale = 1.0 / (1.0 - problem.dropout_p) if problem.dropout_position == "post" else 1.0
    s = abs(problem.scale) * post_scale
    return {
        "y": step * s * B.sum(1).expand(*problem.leading, problem.N),
        "lora_B": step * s * g.sum(0)[:, None].expand(problem.N, problem.r),
        "lora_A": step * x.sum(0)[None, :].expand(problem.r, problem.K),
        "x": step * A.sum(0).expand(*problem.leading, problem.K),
    }


def assert_within_bound(actual: Tensor, expected: Tensor, magnitude: Tensor, problem: Problem, length: int,
                        what: str, extra_roundings: int = 0, floor: Optional[Tensor] = None) -> None:
    """|actual - expected| <= (c * u + 2 L u32) * magnitude + c * subnormal step, elementwise.

    u is the unit roundoff of the least precise dtype involved, c = STORAGE_ROUNDINGS
    (+ extra_roundings), L the longest dot product (`length`), u32 the float32 unit.
    `expected` and `magnitude` are float64 on actual's device; `floor` (optional) adds an
    absolute term, e.g. from intermediate_underflow_floors.
    """
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    low = problem.lowest_precision()
    relative = (STORAGE_ROUNDINGS + extra_roundings) * unit_roundoff(low) + 2 * length * FLOAT32_UNIT
    # Absolute floor: each rounding can lose up to one subnormal step of the narrowest-range
    # dtype involved. fp16's step is 2**-24 (6e-8), so an fp16 LoRA path under a bf16 base
    # (or the reverse) loses that much on tiny values (seen on the H200: 2.5e-8 off 1.5e-7).
    subnormal_step = max(subnormal_loss(d, actual.device) for d in (problem.dtype, problem.lora_dtype))
    bound = relative * magnitude + (STORAGE_ROUNDINGS + extra_roundings) * subnormal_step
    if floor is not None:
        bound = bound + floor.to(bound.device)
    error = (actual.detach().to(torch.float64) - expected).abs()
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values for finite inputs"
    excess = error - bound
    if bool((excess > 0).any()):
        worst = int(excess.argmax())
        raise AssertionError(
            f"{what}: error {error.flatten()[worst].item():.4g} > bound {bound.flatten()[worst].item():.4g} at flat "
            f"index {worst} (expected {expected.flatten()[worst].item():.6g}, got "
            f"{actual.detach().flatten()[worst].item():.6g}; {int((excess > 0).sum())} elements out of bound)"
        )
