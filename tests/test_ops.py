"""CPU (and meta) tests of the operators torch.ops.lora.linear and torch.ops.lora.linear_backward.

Every numerical check compares against lora_ext.reference.lora_linear_reference evaluated in
float64; the dropout mask of the reference comes from its own numpy Philox, so these tests also
check the kernels' masks. The nn.Module API is tested in test_modules.py and friends.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from typing import Iterator, Optional

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ext
from lora_ext import ops
from lora_ext.reference import dropout_keep_mask, lora_linear_reference

Tensor = torch.Tensor

# Adapter dtype used by the "mixed" samples: a different floating dtype from the base.
OTHER_LORA_DTYPE = {
    torch.float32: torch.float16,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float64: torch.float32,
}

# Largest allowed |actual - reference| relative to max |reference|, by the least precise dtype
# the computation passes through. Measured errors on these samples are about 10x below these
# (float16's was 1e-2 until 2026-12-05, loose enough for a 0.8% error in xa to pass).
RELATIVE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}

GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")

_DEFAULT_NUM_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These tensors are tiny. With two OpenMP threads on a busy 2-core machine a 3x17 @ 17x5
    # matmul was measured at ~30 ms (the threads wait on each other) against ~3 us with one
    # thread, which made this file several times slower. Tests of the parallel dropout loop
    # switch back to the default thread count (see all_threads).
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_DEFAULT_NUM_THREADS)


@pytest.fixture
def all_threads():
    torch.set_num_threads(_DEFAULT_NUM_THREADS)
    yield
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# Sample inputs
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class LinearSample:
    """One call of lora::linear: its arguments, plus a name for failure messages."""

    name: str
    x: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor
    scale: float
    dropout_p: float
    dropout_position: str
    seed: Optional[Tensor]

    def op_args(self) -> tuple:
        return (
            self.x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, self.dropout_p,
            self.dropout_position, self.seed, "auto",
        )

    def tensors(self) -> dict:
        """The differentiable arguments that are present, by name."""
        named = dict(x=self.x, weight=self.weight, bias=self.bias, lora_A=self.lora_A, lora_B=self.lora_B)
        return {name: t for name, t in named.items() if t is not None}

    def reference(self, **tensors: Optional[Tensor]) -> Tensor:
        args = {**self.tensors(), **tensors}
        return lora_linear_reference(
            args["x"], args.get("weight"), args.get("bias"), args["lora_A"], args["lora_B"], self.scale,
            self.dropout_p, self.dropout_position, self.seed,
        )

    @property
    def lowest_precision_dtype(self) -> torch.dtype:
        dtypes = {self.x.dtype, self.lora_A.dtype}
        return max(dtypes, key=lambda dt: RELATIVE_TOLERANCE[dt])

    def __repr__(self) -> str:
        return f"LinearSample({self.name}, x{tuple(self.x.shape)} {self.x.dtype}, lora {self.lora_A.dtype})"


@dataclasses.dataclass(frozen=True)
class _Case:
    name: str
    leading: tuple  # x's leading shape; x is leading + (K,)
    K: int
    N: int
    r: int
    layout: str = "contiguous"  # contiguous | transposed | sliced | expanded_rows | expanded_cols
    weight: bool = True
    bias: bool = True
    dropout_p: float = 0.0
    position: str = "post"
    seed: Optional[int] = None
    seed_0dim: bool = False
    other_lora_dtype: bool = False
    strided_params: bool = False  # weight, lora_A, lora_B transposed views; bias a strided slice


# Odd sizes on purpose: K, N in {5, 17, 33}, r in {1, 3, 8}; seeds include 0, one above 2**32
# (exercises the key's high word) and a negative one (read as its two's complement).
_CASES = (
    _Case("1d", (), K=5, N=17, r=1),
    _Case("1d_pre", (), K=17, N=33, r=8, dropout_p=0.25, position="pre", seed=3, seed_0dim=True),
    _Case("2d_post_no_bias", (3,), K=17, N=5, r=3, bias=False, dropout_p=0.25, seed=1234567),
    _Case("3d_pre_no_weight", (2, 3), K=33, N=17, r=8, weight=False, dropout_p=0.25, position="pre", seed=2**40 + 17),
    _Case("4d_pre_strided_params", (2, 1, 3), K=5, N=33, r=3, dropout_p=0.25, position="pre", seed=-5,
          strided_params=True),
    _Case("zero_tokens_post", (0,), K=17, N=5, r=3, dropout_p=0.25, seed=7),
    _Case("zero_tokens_3d", (2, 0), K=5, N=17, r=1, bias=False),
    _Case("transposed_post", (7,), K=17, N=33, r=8, layout="transposed", dropout_p=0.25, seed=0,
          strided_params=True),
    _Case("sliced_pre_lora_only", (3, 5), K=33, N=5, r=1, layout="sliced", weight=False, bias=False,
          dropout_p=0.25, position="pre", seed=99),
    _Case("expanded_rows_pre", (6,), K=17, N=5, r=3, layout="expanded_rows", dropout_p=0.25, position="pre", seed=11),
    _Case("expanded_cols", (2, 4), K=5, N=17, r=8, layout="expanded_cols"),
    _Case("lora_only", (7,), K=5, N=5, r=3, weight=False, bias=False),
    _Case("mixed_dtype", (2, 3), K=17, N=33, r=8, other_lora_dtype=True),
    _Case("mixed_dtype_transposed_post", (5,), K=33, N=17, r=3, layout="transposed", dropout_p=0.25, seed=21,
          other_lora_dtype=True),
    _Case("mixed_dtype_pre_no_weight", (4,), K=5, N=17, r=1, weight=False, dropout_p=0.25, position="pre",
          seed=2**33, seed_0dim=True, other_lora_dtype=True, strided_params=True),
    _Case("mixed_dtype_zero_tokens", (0, 3), K=17, N=5, r=3, dropout_p=0.25, seed=5, other_lora_dtype=True),
)


def _make_x(case: _Case, device, dtype, requires_grad: bool) -> Tensor:
    """x of shape leading + (K,) in the case's memory layout (a view of a leaf when not contiguous)."""

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)

    lead, K = case.leading, case.K
    if case.layout == "contiguous":
        return leaf(*lead, K)
    if case.layout == "transposed":  # last dimension has stride != 1
        return leaf(*lead[:-1], K, lead[-1]).transpose(-1, -2)
    if case.layout == "sliced":  # every other column and every other leading row of a larger tensor
        return leaf(2 * lead[0], *lead[1:], 2 * K + 1)[::2, ..., 1::2]
    if case.layout == "expanded_rows":  # stride 0 across tokens: one row broadcast to all
        return leaf(*(1 for _ in lead), K).expand(*lead, K)
    if case.layout == "expanded_cols":  # stride 0 across features
        return leaf(*lead, 1).expand(*lead, K)
    raise AssertionError(case.layout)


def sample_inputs(device, *, requires_grad: bool, dtype: torch.dtype = torch.float32) -> Iterator[LinearSample]:
    """Samples of lora::linear with x and the base in `dtype` (style of pytorch/extension-cpp).

    The "mixed_dtype" samples carry adapters in OTHER_LORA_DTYPE[dtype]. Every tensor is random
    (lora_B included, unlike a fresh LoRA layer) so that every term of the formula is tested.
    """
    for case in _CASES:
        lora_dtype = OTHER_LORA_DTYPE[dtype] if case.other_lora_dtype else dtype

        def make(*shape, dt=dtype, std=1.0):
            if case.strided_params:  # a view of a leaf with another memory layout
                if len(shape) == 2:
                    return make_leaf(shape[1], shape[0], dt=dt, std=std).t()
                return make_leaf(2 * shape[0], dt=dt, std=std)[::2]
            return make_leaf(*shape, dt=dt, std=std)

        def make_leaf(*shape, dt, std):
            return (torch.randn(*shape, device=device, dtype=dt) * std).requires_grad_(requires_grad)

        seed = None
        if case.seed is not None:
            seed = torch.tensor(case.seed if case.seed_0dim else [case.seed], dtype=torch.int64, device=device)
        yield LinearSample(
            name=case.name,
            x=_make_x(case, device, dtype, requires_grad),
            weight=make(case.N, case.K, std=case.K**-0.5) if case.weight else None,
            bias=make(case.N) if case.bias else None,
            lora_A=make(case.r, case.K, dt=lora_dtype, std=case.K**-0.5),
            lora_B=make(case.N, case.r, dt=lora_dtype),
            scale=2.0 if case.r == 8 else 0.75,
            dropout_p=case.dropout_p,
            dropout_position=case.position,
            seed=seed,
        )


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def assert_close_to_reference(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    """max |actual - expected| <= RELATIVE_TOLERANCE[dtype] * max |expected| (expected in float64)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    error = (actual.detach().double() - expected.detach()).abs().max().item()
    magnitude = expected.detach().abs().max().item()
    bound = RELATIVE_TOLERANCE[dtype] * magnitude + 1e-12
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} (max |reference| {magnitude:.3g})"


def float64_leaves(sample: LinearSample) -> dict:
    return {name: t.detach().to(torch.float64, copy=True).requires_grad_() for name, t in sample.tensors().items()}


def assert_sample_matches_reference(sample: LinearSample, y: Tensor, what: str) -> dict:
    """y (from the op on `sample`) and every gradient against the float64 reference, with the
    bound of sample.lowest_precision_dtype; returns {name: gradient} for further checks."""
    leaves = float64_leaves(sample)
    expected = sample.reference(**leaves)
    tol_dtype = sample.lowest_precision_dtype
    assert_close_to_reference(y, expected, tol_dtype, f"{what} y")
    grad_y = torch.randn_like(y)
    inputs = sample.tensors()
    grads = torch.autograd.grad(y, list(inputs.values()), grad_y)
    expected_grads = torch.autograd.grad(expected, list(leaves.values()), grad_y.double())
    for name, grad, expected_grad in zip(inputs, grads, expected_grads):
        assert_close_to_reference(grad, expected_grad, tol_dtype, f"{what} grad {name}")
    return dict(zip(inputs, grads))


def backward_args(sample: LinearSample, output_mask) -> tuple:
    """Arguments of lora::linear_backward for `sample`, with xa taken from the forward op."""
    with torch.no_grad():
        y, xa = torch.ops.lora.linear(*sample.op_args())
    grad_y = torch.randn_like(y)
    s = sample
    return (
        grad_y, s.x.detach(), None if s.weight is None else s.weight.detach(), s.lora_A.detach(),
        s.lora_B.detach(), xa, s.scale, s.dropout_p, s.dropout_position, s.seed, list(output_mask), "auto",
    )


def small_inputs(dtype=torch.float32, *, M=4, K=5, N=7, r=3, requires_grad=True):
    def make(*shape, std=1.0):
        return (torch.randn(*shape, dtype=dtype) * std).requires_grad_(requires_grad)

    return make(M, K), make(N, K, std=K**-0.5), make(N), make(r, K, std=K**-0.5), make(N, r)


class RecordOps(TorchDispatchMode):
    """Records every operator call that reaches the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------
# Numerics: forward and every gradient against the float64 reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_forward_and_gradients_match_reference(dtype):
    torch.manual_seed(0)
    for sample in sample_inputs("cpu", requires_grad=True, dtype=dtype):
        y, xa = torch.ops.lora.linear(*sample.op_args())
        assert y.dtype == dtype, f"{sample}: y dtype {y.dtype}"
        assert xa.dtype == sample.lora_A.dtype and xa.shape == (math.prod(sample.x.shape[:-1]), sample.lora_A.shape[0])
        grads = assert_sample_matches_reference(sample, y, str(sample))
        inputs = sample.tensors()
        for name, grad in grads.items():
            assert grad.dtype == inputs[name].dtype, f"{sample}: grad of {name} has dtype {grad.dtype}"


def test_gradients_from_a_broadcast_grad_output_match_reference():
    # y.sum().backward() hands backward a stride-0 (expanded) grad_y.
    torch.manual_seed(1)
    for sample in sample_inputs("cpu", requires_grad=True):
        y = ops.linear(*sample.op_args())
        inputs = sample.tensors()
        grads = torch.autograd.grad(y.sum(), list(inputs.values()))
        leaves = float64_leaves(sample)
        expected_grads = torch.autograd.grad(sample.reference(**leaves).sum(), list(leaves.values()))
        for name, grad, expected_grad in zip(inputs, grads, expected_grads):
            assert_close_to_reference(grad, expected_grad, sample.lowest_precision_dtype, f"{sample} grad {name}")


def test_wrapper_matches_op_and_returns_only_y():
    torch.manual_seed(2)
    for sample in sample_inputs("cpu", requires_grad=False):
        y = ops.linear(*sample.op_args())
        y_op, _ = torch.ops.lora.linear(*sample.op_args())
        torch.testing.assert_close(y, y_op, rtol=0, atol=0)


# Autograd is C++ (csrc/lora_autograd.cpp): no Python runs for it in eager or compiled calls.


def test_autograd_node_is_the_cpp_one_for_wrapper_and_op():
    x, weight, bias, lora_A, lora_B = small_inputs()
    for y in (ops.linear(x, weight, bias, lora_A, lora_B, 0.5), torch.ops.lora.linear(x, weight, bias, lora_A, lora_B, 0.5)[0]):
        assert "LinearFunction" in y.grad_fn.name(), y.grad_fn.name()


def test_xa_output_is_not_differentiable():
    x, weight, bias, lora_A, lora_B = small_inputs()
    y, xa = torch.ops.lora.linear(x, weight, bias, lora_A, lora_B, 0.5)
    assert y.requires_grad and not xa.requires_grad


def test_backward_allocates_no_zero_gradient_for_xa():
    # xa is an output of the op but not differentiable: autograd hands its backward no gradient for
    # it, and the node must not have one materialised as zeros (an (M, r) tensor and a fill per call:
    # 256 KiB of peak memory at M = 8192, r = 16 on the GPU, 1 MiB at r = 64).
    M, K, N, r = 6, 17, 33, 3  # M*r differs from every other size of the call
    x, weight, bias, lora_A, lora_B = small_inputs(M=M, K=K, N=N, r=r)
    y = ops.linear(x, weight, bias, lora_A, lora_B, 0.5)
    fills = []

    class RecordFills(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.zero_, torch.ops.aten.fill_, torch.ops.aten.zeros,
                                       torch.ops.aten.new_zeros, torch.ops.aten.zeros_like):
                fills.append((func, tuple(out.shape)))
            return out

    with RecordFills():
        grads = torch.autograd.grad(y, [x, lora_A, lora_B], torch.randn(M, N))
    assert all(g is not None for g in grads)
    assert not [f for f in fills if f[1] == (M, r)], f"backward filled an (M, r) tensor: {fills}"


@pytest.mark.parametrize("p,position,grad_B_last", [(0.0, "post", True), (0.25, "pre", True), (0.25, "post", False)],
                         ids=["no_dropout", "pre", "post"])
def test_backward_computes_dB_after_releasing_grad_xa(p, position, grad_B_last):
    """Without 'post' dropout dB = s gᵀ xa reads only g and xa, so the backward computes it last, after
    dx and dA, the GEMMs that read grad_xa (M, r), which it releases first: the two never need their
    memory at once (NOTES.md #58; on the GPU the same order, and a GPU test measures the peak). With
    'post' dropout dB comes with grad_xa from the masked g, first. The backward's GEMMs in the order
    the profiler saw them, told apart by their operands' shapes (all sizes distinct)."""
    from torch.profiler import ProfilerActivity, profile

    M, K, N, r = 40, 24, 56, 3
    x, weight, bias, lora_A, lora_B = small_inputs(M=M, K=K, N=N, r=r)
    y = ops.linear(x, weight, bias, lora_A, lora_B, 0.5, dropout_p=p, dropout_position=position,
                   seed=torch.tensor([5]))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        grads = torch.autograd.grad(y, [x, lora_A, lora_B], torch.randn(M, N))
    assert all(g is not None for g in grads)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    # each GEMM's two operands (addmm's after the tensor it adds)
    gemms = [e.input_shapes[:2] if e.name == "aten::mm" else e.input_shapes[1:3]
             for e in events if e.name in ("aten::mm", "aten::addmm", "aten::addmm_")]
    # dB's GEMM is gᵀ (N, M) times xa (M, r); dx's and dA's read grad_xa as (M, r) or (r, M)
    grad_B_at = [i for i, operands in enumerate(gemms) if operands == [[N, M], [M, r]]]
    grad_xa_read_at = [i for i, operands in enumerate(gemms)
                       if i not in grad_B_at and ([M, r] in operands or [r, M] in operands)]
    assert len(grad_B_at) == 1 and len(grad_xa_read_at) == 2, gemms
    assert (grad_B_at[0] > max(grad_xa_read_at)) == grad_B_last, gemms


def test_undefined_output_gradient_gives_no_gradients():
    # With zeros no longer materialised, the node can be called with no gradient for y at all
    # (a later node returned None for it): its inputs then get none, as for a built-in op.
    class DropGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    x, weight, bias, lora_A, lora_B = small_inputs()
    y = ops.linear(x, weight, bias, lora_A, lora_B, 0.5)
    gx, gA = torch.autograd.grad(DropGradient.apply(y).sum() + 0 * x.sum(), [x, lora_A], allow_unused=True)
    assert gA is None
    torch.testing.assert_close(gx, torch.zeros_like(x), rtol=0, atol=0)


def test_no_autograd_node_without_grad_mode_or_trainable_inputs():
    x, weight, bias, lora_A, lora_B = small_inputs()
    with torch.no_grad():
        y = ops.linear(x, weight, bias, lora_A, lora_B, 0.5)
    assert y.grad_fn is None and not y.requires_grad
    frozen = [t.detach() for t in (x, weight, bias, lora_A, lora_B)]
    y_frozen = ops.linear(*frozen, 0.5)
    assert y_frozen.grad_fn is None
    torch.testing.assert_close(y, y_frozen, rtol=0, atol=0)


def test_create_graph_gives_the_same_first_order_gradients():
    x, weight, bias, lora_A, lora_B = small_inputs()
    grad_out = torch.randn(4, 7)
    plain = torch.autograd.grad(ops.linear(x, weight, bias, lora_A, lora_B, 0.5), [x, lora_A, lora_B], grad_out)
    graphed = torch.autograd.grad(ops.linear(x, weight, bias, lora_A, lora_B, 0.5), [x, lora_A, lora_B], grad_out,
                                  create_graph=True)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tensor_subclass_inputs_go_through_the_same_autograd():
    class Tagged(torch.Tensor):
        pass

    x, weight, bias, lora_A, lora_B = small_inputs()
    y = ops.linear(x.detach().as_subclass(Tagged).requires_grad_(), weight, bias, lora_A, lora_B, 0.5)
    y.sum().backward()
    assert lora_A.grad is not None and lora_A.grad.abs().sum() > 0


def test_saved_tensors_are_released_after_backward():
    x, weight, bias, lora_A, lora_B = small_inputs()
    y = ops.linear(x, weight, bias, lora_A, lora_B, 0.5)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time|freed"):
        y.sum().backward()


def test_linear_backward_op_matches_reference_for_every_mask():
    torch.manual_seed(3)
    masks = [(True,) * 5, (True, False, False, True, True), (False, False, False, True, False), (False,) * 5]
    for sample in sample_inputs("cpu", requires_grad=False):
        leaves = float64_leaves(sample)
        expected = sample.reference(**leaves)
        for mask in masks:
            mask = tuple(m and sample.tensors().get(name) is not None for m, name in zip(mask, GRAD_NAMES))
            args = backward_args(sample, mask)
            grads = torch.ops.lora.linear_backward(*args)
            expected_grads = torch.autograd.grad(
                expected, list(leaves.values()), args[0].double(), retain_graph=True
            )
            expected_by_name = dict(zip(leaves, expected_grads))
            for name, needed, grad in zip(GRAD_NAMES, mask, grads):
                if needed:
                    assert_close_to_reference(grad, expected_by_name[name], sample.lowest_precision_dtype,
                                              f"{sample} mask {mask} grad {name}")
                else:
                    assert grad.shape == (0,), f"{sample} mask {mask}: unneeded grad {name} has shape {grad.shape}"


# ---------------------------------------------------------------------------
# The 'post' backward in two halves (lora::post_dropout_grad_y, then lora::linear_backward_from_grad_xa,
# xa released between them: csrc/lora_autograd.cpp)
# ---------------------------------------------------------------------------

POST_SCALE, POST_P, POST_SEED = 0.7, 0.3, 4242


def _post_dropout_layer(dtype=torch.float32, *, bias=True, lead=(3, 13), K=17, N=11, r=5):
    """lora::linear with 'post' dropout on fresh random inputs: (y, trainable leaves by name, the frozen
    weight, grad_out); lora::linear's second output (xa) is not kept."""
    torch.manual_seed(11)
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    weight = torch.randn(N, K, dtype=dtype) * K**-0.5
    b = torch.randn(N, dtype=dtype, requires_grad=True) if bias else None
    lora_A = (torch.randn(r, K, dtype=dtype) * K**-0.5).requires_grad_()
    lora_B = torch.randn(N, r, dtype=dtype, requires_grad=True)
    y, _ = torch.ops.lora.linear(x, weight, b, lora_A, lora_B, POST_SCALE, POST_P, "post",
                                 torch.tensor([POST_SEED]))
    leaves = {"x": x, "bias": b, "lora_A": lora_A, "lora_B": lora_B}
    return y, {k: v for k, v in leaves.items() if v is not None}, weight, torch.randn(*lead, N, dtype=dtype)


def _lora_calls(record: RecordOps) -> list:
    return [str(func) for func, _ in record.calls if str(func).startswith("lora.")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_post_dropout_backward_in_two_halves_gives_the_one_op_bits(dtype, bias):
    """Without the graph kept the 'post' backward runs as its two halves, with it kept (retain_graph) as
    lora::linear_backward: the same gradients, bit for bit, each within the float64 reference's bound."""
    grads, calls = {}, {}
    for retain in (True, False):
        y, leaves, weight, grad_out = _post_dropout_layer(dtype, bias=bias)
        with RecordOps() as record:
            grads[retain] = torch.autograd.grad(y, list(leaves.values()), grad_out, retain_graph=retain)
        calls[retain] = _lora_calls(record)
    assert calls[True] == ["lora.linear_backward.default"], calls
    assert calls[False] == ["lora.post_dropout_grad_y.default", "lora.linear_backward_from_grad_xa.default"], calls
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y64 = lora_linear_reference(leaves64["x"], weight.double(), leaves64.get("bias"), leaves64["lora_A"],
                                leaves64["lora_B"], POST_SCALE, dropout_p=POST_P, dropout_position="post",
                                seed=POST_SEED)
    expected = torch.autograd.grad(y64, list(leaves64.values()), grad_out.double())
    for name, one_op, halves, ref in zip(leaves, grads[True], grads[False], expected):
        assert torch.equal(one_op, halves), f"grad of {name}: the two halves differ from the one op"
        assert_close_to_reference(halves, ref, dtype, f"grad of {name}")


def test_post_dropout_backward_frees_xa_before_its_second_half():
    """xa (M x r, saved by the forward) is released once the masked step has used it: when
    lora::linear_backward_from_grad_xa starts, nothing holds it any more (so it is not alive beside dA
    and dx: the peak memory with 'post' dropout, benchmarks/NOTES.md #74)."""
    import weakref

    y, leaves, _, grad_out = _post_dropout_layer()
    xa_ref = {}

    class FindXa(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.lora.post_dropout_grad_y.default:
                xa_ref["ref"] = weakref.ref(args[2])
            if func is torch.ops.lora.linear_backward_from_grad_xa.default:
                xa_ref["alive_at_second_half"] = xa_ref["ref"]() is not None
            return func(*args, **(kwargs or {}))

    with FindXa():
        torch.autograd.grad(y, list(leaves.values()), grad_out)
    assert xa_ref.get("alive_at_second_half") is False, xa_ref


@pytest.mark.parametrize("case", ["dB_only", "create_graph"])
def test_post_dropout_xa_is_released_by_the_one_op_too(case):
    """Where the backward is the one op (only dB wanted; create_graph without retain_graph) xa, kept in
    saved_data, is still released when the graph is not kept, as a saved variable is: after the backward
    nothing holds it, while y (and so the graph's node) is alive."""
    import weakref

    torch.manual_seed(16)
    x, weight, bias, lora_A, lora_B = small_inputs(M=9, K=6, N=5, r=2)
    y, xa = torch.ops.lora.linear(x, weight, bias, lora_A, lora_B, 0.5, 0.25, "post", torch.tensor([8]))
    xa_ref = weakref.ref(xa)
    del xa
    if case == "dB_only":
        with RecordOps() as record:
            torch.autograd.grad(y, [lora_B], torch.ones_like(y))
        assert _lora_calls(record) == ["lora.linear_backward.default"]
        del record  # (it holds the calls' arguments, xa among them)
    else:
        with pytest.raises(RuntimeError, match="derivative for lora::linear_backward is not implemented"):
            grads = torch.autograd.grad(y, [x, lora_A], torch.ones_like(y), create_graph=True, retain_graph=False)
            torch.autograd.grad(grads[0].sum(), [lora_A])
    assert y.grad_fn is not None and xa_ref() is None, "xa outlived a backward that did not keep the graph"


def test_post_dropout_backward_can_be_retried_after_its_masked_step_failed():
    """A backward whose first half raised (as an out-of-memory error would) left xa in place: calling it
    again gives the gradients."""
    y, leaves, _, grad_out = _post_dropout_layer()

    class FailOnce(TorchDispatchMode):
        failed = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.lora.post_dropout_grad_y.default and not FailOnce.failed:
                FailOnce.failed = True
                raise RuntimeError("injected failure")
            return func(*args, **(kwargs or {}))

    with FailOnce(), pytest.raises(RuntimeError, match="injected failure"):
        torch.autograd.grad(y, list(leaves.values()), grad_out, retain_graph=False)
    got = torch.autograd.grad(y, list(leaves.values()), grad_out, retain_graph=True)
    expected = torch.autograd.grad(y, list(leaves.values()), grad_out)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_post_dropout_backward_without_dA_or_dx_is_one_op():
    """With neither dA nor dx wanted (only dB, the bias) there is no grad_xa for the second half and
    nothing to free xa for: the one op, as with the graph kept."""
    y, leaves, _, grad_out = _post_dropout_layer()
    with RecordOps() as record:
        torch.autograd.grad(y, [leaves["lora_B"], leaves["bias"]], grad_out)
    assert _lora_calls(record) == ["lora.linear_backward.default"]


def test_post_dropout_backward_under_saved_tensor_hooks_is_one_op_and_the_hooks_see_xa():
    """Under saved-tensor hooks (offloading, checkpointing) xa is saved like the other tensors, so the
    hooks see it, and the backward is the one op (xa lives until it ends)."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y, leaves, _, grad_out = _post_dropout_layer(lead=(39,), r=5)
    with RecordOps() as record:
        torch.autograd.grad(y, list(leaves.values()), grad_out)
    assert _lora_calls(record) == ["lora.linear_backward.default"]
    assert any(t.shape == (39, 5) for t in packed), [tuple(t.shape) for t in packed]


def test_post_dropout_backward_refuses_xa_modified_in_place():
    """xa is kept outside autograd's saved variables with 'post' dropout (to be released early); its
    version is still checked, as a saved variable's would be."""
    torch.manual_seed(12)
    x, weight, bias, lora_A, lora_B = small_inputs()
    y, xa = torch.ops.lora.linear(x, weight, bias, lora_A, lora_B, 0.5, 0.25, "post", torch.tensor([3]))
    with torch.no_grad():
        xa.add_(1.0)
    with pytest.raises(RuntimeError, match="xa .*modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both", "grad_xa", "grad_B", "none"])
def test_post_dropout_grad_y_matches_float64(need):
    """(s drop(dY) B, s drop(dY)^T xa) with the reference's mask, empty where not asked."""
    torch.manual_seed(13)
    M, N, r, scale, p, seed = 21, 19, 3, 0.6, 0.4, 77
    grad_y, lora_B, xa = torch.randn(3, 7, N), torch.randn(N, r), torch.randn(M, r)
    grad_xa, grad_B = torch.ops.lora.post_dropout_grad_y(grad_y, lora_B, xa, scale, p, torch.tensor([seed]),
                                                         list(need))
    dropped = grad_y.reshape(M, N).double() * dropout_keep_mask(seed, M, N, p).double() / (1 - p)
    if need[0]:
        assert_close_to_reference(grad_xa, scale * dropped @ lora_B.double(), torch.float32, "grad_xa")
    else:
        assert grad_xa.shape == (0,)
    if need[1]:
        assert_close_to_reference(grad_B, scale * dropped.t() @ xa.double(), torch.float32, "grad_B")
    else:
        assert grad_B.shape == (0,)


@pytest.mark.parametrize("mask", [(True,) * 4, (False, False, False, True), (True, False, False, False),
                                  (False, True, True, False)], ids=["all", "dA", "dx", "base"])
def test_linear_backward_from_grad_xa_matches_float64(mask):
    """(dx, dW, db, dA) = (dY W + grad_xa A, dY^T x, sum dY, grad_xa^T x), empty where not asked."""
    torch.manual_seed(14)
    K, N, r = 9, 6, 2
    grad_y, x, weight = torch.randn(2, 5, N), torch.randn(2, 5, K), torch.randn(N, K)
    lora_A, lora_B, grad_xa = torch.randn(r, K), torch.randn(N, r), torch.randn(10, r)
    got = torch.ops.lora.linear_backward_from_grad_xa(grad_y, x, weight, lora_A, lora_B, grad_xa, list(mask))
    g, x2 = grad_y.reshape(10, N).double(), x.reshape(10, K).double()
    expected = ((g @ weight.double() + grad_xa.double() @ lora_A.double()).reshape(x.shape), g.t() @ x2,
                g.sum(0), grad_xa.double().t() @ x2)
    for name, needed, grad, ref in zip(("dx", "dW", "db", "dA"), mask, got, expected):
        if needed:
            assert_close_to_reference(grad, ref, torch.float32, name)
        else:
            assert grad.shape == (0,), f"{name} not asked, got shape {tuple(grad.shape)}"


def test_opcheck_post_dropout_halves():
    torch.manual_seed(15)
    N, r, K = 7, 3, 5
    seed = torch.tensor([9])
    for lead, need in (((4,), [True, True]), ((2, 3), [True, False]), ((6,), [False, True])):
        M = math.prod(lead)
        torch.library.opcheck(torch.ops.lora.post_dropout_grad_y.default,
                              (torch.randn(*lead, N), torch.randn(N, r), torch.randn(M, r), 0.5, 0.2, seed, need, 64))
    for weight, mask in ((torch.randn(N, K), [True, True, True, True]), (None, [True, False, True, True])):
        torch.library.opcheck(torch.ops.lora.linear_backward_from_grad_xa.default,
                              (torch.randn(2, 3, N), torch.randn(2, 3, K), weight, torch.randn(r, K),
                               torch.randn(N, r), torch.randn(6, r), mask))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_post_dropout_halves_bad_input(device):
    N, r, K, M = 7, 3, 5, 4
    grad_y, lora_B, xa = torch.randn(M, N, device=device), torch.randn(N, r, device=device), torch.randn(M, r, device=device)
    seed = torch.tensor([1], device=device)
    step = torch.ops.lora.post_dropout_grad_y
    with pytest.raises(RuntimeError, match=r"xa must have shape \(4, 3\)"):
        step(grad_y, lora_B, torch.randn(M + 1, r, device=device), 0.5, 0.2, seed, [True, True])
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        step(torch.randn(M, N + 1, device=device), lora_B, xa, 0.5, 0.2, seed, [True, True])
    with pytest.raises(ValueError, match=r"dropout_p must be in \(0, 1\)"):
        step(grad_y, lora_B, xa, 0.5, 0.0, seed, [True, True])
    with pytest.raises(TypeError, match="seed must be an int64 tensor"):
        step(grad_y, lora_B, xa, 0.5, 0.2, torch.tensor([1.0], device=device), [True, True])
    with pytest.raises(TypeError, match="xa dtype"):
        step(grad_y, lora_B, xa.double(), 0.5, 0.2, seed, [True, True])
    with pytest.raises(ValueError, match="partial_bytes_cap must be >= 0"):
        step(grad_y, lora_B, xa, 0.5, 0.2, seed, [True, True], -1)
    rest = torch.ops.lora.linear_backward_from_grad_xa
    x, weight, lora_A = torch.randn(M, K, device=device), torch.randn(N, K, device=device), torch.randn(r, K, device=device)
    with pytest.raises(RuntimeError, match=r"grad_xa must have shape \(4, 3\)"):
        rest(grad_y, x, weight, lora_A, lora_B, torch.randn(M, r + 1, device=device), [True] * 4)
    with pytest.raises(TypeError, match="grad_xa dtype"):
        rest(grad_y, x, weight, lora_A, lora_B, xa.double(), [True] * 4)
    with pytest.raises(RuntimeError, match="grad of weight requested but weight is None"):
        rest(grad_y, x, None, lora_A, lora_B, xa, [True] * 4)


# ---------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_linear(requires_grad):
    torch.manual_seed(4)
    for sample in sample_inputs("cpu", requires_grad=requires_grad):
        torch.library.opcheck(torch.ops.lora.linear.default, sample.op_args())


def test_opcheck_linear_backward_with_output_mask_subsets():
    torch.manual_seed(5)
    masks = [
        (True,) * 5,
        (False, False, False, True, True),  # the usual LoRA case: frozen base, input needs no grad
        (True, False, False, True, True),
        (False, True, True, False, False),
        (False,) * 5,
    ]
    for i, sample in enumerate(sample_inputs("cpu", requires_grad=False)):
        mask = masks[i % len(masks)]
        if sample.weight is None:
            mask = (mask[0], False) + mask[2:]
        torch.library.opcheck(torch.ops.lora.linear_backward.default, backward_args(sample, mask))


# ---------------------------------------------------------------------------
# gradcheck and double backward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dropout_p, position", [(0.0, "post"), (0.3, "post"), (0.3, "pre")], ids=["no_dropout", "post", "pre"]
)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
def test_gradcheck_float64(dropout_p, position, with_weight):
    torch.manual_seed(6)
    x, weight, bias, lora_A, lora_B = small_inputs(torch.float64)
    x = x.detach().reshape(2, 2, 5).requires_grad_()  # 3-D x: leading dims are flattened and restored
    if not with_weight:
        weight = None
    seed = torch.tensor([987654321], dtype=torch.int64)

    def y_of(*tensors):
        x, lora_A, lora_B, bias, *rest = tensors
        w = rest[0] if rest else None
        return torch.ops.lora.linear(x, w, bias, lora_A, lora_B, 1.5, dropout_p, position, seed)[0]

    inputs = (x, lora_A, lora_B, bias) + ((weight,) if weight is not None else ())
    assert torch.autograd.gradcheck(y_of, inputs)


def test_double_backward_raises_clear_error():
    x, weight, bias, lora_A, lora_B = small_inputs()
    y = ops.linear(x, weight, bias, lora_A, lora_B, 0.5)
    (grad_A,) = torch.autograd.grad(y.square().sum(), lora_A, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for lora::linear_backward is not implemented"):
        grad_A.sum().backward()


# ---------------------------------------------------------------------------
# Only the gradients that are needed
# ---------------------------------------------------------------------------


def test_only_adapter_gradients_when_base_and_input_are_frozen():
    x, weight, bias, lora_A, lora_B = small_inputs(requires_grad=False)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = ops.linear(x, weight, bias, lora_A, lora_B, 0.5, 0.25, "pre")
    with RecordOps() as recorded:
        y.sum().backward()
    assert x.grad is None and weight.grad is None and bias.grad is None
    assert lora_A.grad is not None and lora_B.grad is not None
    backward_calls = [args for func, args in recorded.calls if func is torch.ops.lora.linear_backward.default]
    assert len(backward_calls) == 1
    assert list(backward_calls[0][10]) == [False, False, False, True, True]


@pytest.mark.parametrize("trainable", ["x", "weight", "bias", "lora_A", "lora_B"])
def test_one_trainable_tensor_asks_backward_for_its_gradient_only(trainable):
    inputs = dict(zip(GRAD_NAMES, small_inputs(requires_grad=False)))
    inputs[trainable].requires_grad_()
    y = ops.linear(*inputs.values(), 0.5)
    with RecordOps() as recorded:
        (grad,) = torch.autograd.grad(y.sum(), inputs[trainable])
    assert grad.shape == inputs[trainable].shape
    (call,) = [args for func, args in recorded.calls if func is torch.ops.lora.linear_backward.default]
    assert list(call[10]) == [name == trainable for name in GRAD_NAMES]


def test_linear_backward_returns_empty_tensors_for_unneeded_gradients():
    x, weight, bias, lora_A, lora_B = small_inputs(requires_grad=False)
    y, xa = torch.ops.lora.linear(x, weight, bias, lora_A, lora_B, 0.5)
    grads = torch.ops.lora.linear_backward(
        torch.randn_like(y), x, weight, lora_A, lora_B, xa, 0.5, 0.0, "post", None, [False, False, False, True, True]
    )
    assert [tuple(g.shape) for g in grads] == [(0,), (0,), (0,), tuple(lora_A.shape), tuple(lora_B.shape)]
    # The typed wrapper turns the empty ones into None.
    wrapped = ops.linear_backward(
        torch.randn_like(y), x, weight, lora_A, lora_B, xa, 0.5, 0.0, "post", None, [False, False, False, True, True]
    )
    assert wrapped[:3] == (None, None, None) and wrapped[3].shape == lora_A.shape


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["pre", "post"])
def test_dropout_matches_reference_with_same_seed(position):
    torch.manual_seed(7)
    x, weight, bias, lora_A, lora_B = small_inputs(M=64, K=33, N=17, r=8)
    seed = torch.tensor([424242], dtype=torch.int64)
    y = ops.linear(x, weight, bias, lora_A, lora_B, 2.0, 0.5, position, seed)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, lora_A, lora_B)]
    expected = lora_linear_reference(*leaves, 2.0, 0.5, position, seed)
    assert_close_to_reference(y, expected, torch.float32, f"{position} y")
    # The other position's formula gives a different result: the test tells pre from post.
    other = lora_linear_reference(*leaves, 2.0, 0.5, "post" if position == "pre" else "pre", seed)
    assert (y.double() - other).abs().max() > 1e-2
    # Backward regenerates the forward's mask from the seed.
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, bias, lora_A, lora_B), grad_y)
    expected_grads = torch.autograd.grad(expected, leaves, grad_y.double())
    for name, grad, expected_grad in zip(GRAD_NAMES, grads, expected_grads):
        assert_close_to_reference(grad, expected_grad, torch.float32, f"{position} grad {name}")


def test_same_seed_gives_identical_results_and_other_seeds_differ():
    x, weight, bias, lora_A, lora_B = small_inputs(M=32, K=17, N=33, r=3, requires_grad=False)
    for position in ("pre", "post"):
        outs = [
            ops.linear(x, weight, bias, lora_A, lora_B, 1.0, 0.25, position, torch.tensor([s], dtype=torch.int64))
            for s in (5, 5, 6)
        ]
        assert torch.equal(outs[0], outs[1])
        assert not torch.equal(outs[0], outs[2])


def test_manual_seed_reproduces_drawn_seeds():
    x, weight, bias, lora_A, lora_B = small_inputs(M=32, K=17, N=33, r=3, requires_grad=False)
    for position in ("pre", "post"):
        torch.manual_seed(1234)
        first = ops.linear(x, weight, bias, lora_A, lora_B, 1.0, 0.25, position)
        second = ops.linear(x, weight, bias, lora_A, lora_B, 1.0, 0.25, position)
        torch.manual_seed(1234)
        again = ops.linear(x, weight, bias, lora_A, lora_B, 1.0, 0.25, position)
        torch.manual_seed(1234)
        drawn = ops.draw_seed(x.device)
        explicit = ops.linear(x, weight, bias, lora_A, lora_B, 1.0, 0.25, position, drawn)
        assert torch.equal(first, again)
        assert torch.equal(first, explicit)
        assert not torch.equal(first, second)  # each call draws a fresh seed, hence a fresh mask


def test_drawn_seed_is_int64_on_inputs_device():
    torch.manual_seed(0)
    seed = ops.draw_seed(torch.device("cpu"))
    assert seed.dtype == torch.int64 and seed.numel() == 1 and seed.device.type == "cpu"


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_post_dropout_mask_is_reference_mask_and_keeps_one_minus_p(p, all_threads):
    # weight None and bias None: y is exactly drop(s * x A^T B^T), so its zeros are the mask.
    torch.manual_seed(8)
    M, K, N, r = 512, 5, 256, 3
    x, _, _, lora_A, lora_B = small_inputs(M=M, K=K, N=N, r=r, requires_grad=False)
    seed = torch.tensor([2**35 + 3], dtype=torch.int64)
    clean = ops.linear(x, None, None, lora_A, lora_B, 1.0)
    y = ops.linear(x, None, None, lora_A, lora_B, 1.0, p, "post", seed)
    kept = y != 0
    assert torch.equal(kept, dropout_keep_mask(int(seed), M, N, p))
    torch.testing.assert_close(y[kept], clean[kept] / (1 - p), rtol=1e-6, atol=1e-6)
    _assert_kept_fraction(kept, p)


def test_philox_matches_the_random123_known_answer():
    # Philox-4x32-10, counter 0, key 0 (Random123's kat_vectors): all four words.
    from lora_ext.reference import philox4

    words = [int(w[0]) for w in philox4(0, np.zeros(1, dtype=np.uint64))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("M, N", [(211, 191), (1, 7), (3, 1)])
def test_mask_groups_of_eight_across_thread_and_block_boundaries(M, N, all_threads):
    # Odd sizes: the CPU loop's thread chunks and 512-element blocks start inside a group of
    # eight elements that shares one Philox evaluation (csrc/lora_cpu.cpp), and the last group
    # is partial.
    x, _, _, lora_A, lora_B = small_inputs(M=M, K=4, N=N, r=2, requires_grad=False)
    seed = torch.tensor([12345], dtype=torch.int64)
    y = ops.linear(x, None, None, lora_A, lora_B, 1.0, 0.5, "post", seed)
    clean = ops.linear(x, None, None, lora_A, lora_B, 1.0)
    expected = dropout_keep_mask(int(seed), M, N, 0.5)
    torch.testing.assert_close(y, torch.where(expected, clean * 2.0, torch.zeros_like(clean)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_pre_dropout_mask_is_reference_mask_and_keeps_one_minus_p(p, all_threads):
    # lora_A = lora_B = identity, no base: y = drop(x), so the mask over x is visible in y.
    torch.manual_seed(9)
    M, K = 2048, 64
    x = torch.randn(M, K)
    eye = torch.eye(K)
    seed = torch.tensor([77], dtype=torch.int64)
    y = ops.linear(x, None, None, eye, eye, 1.0, p, "pre", seed)
    kept = y != 0
    assert torch.equal(kept, dropout_keep_mask(77, M, K, p))
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    _assert_kept_fraction(kept, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pre_dropout_gradients_do_not_depend_on_which_others_are_wanted(dtype):
    """'pre' dropout with 16-bit adapters on CPU: dA with x requiring grad is the same bits as dA alone,
    and dx with lora_A requiring grad the same as dx alone. (When both are wanted the backward keeps
    one mask for both; held in the adapters' dtype, its 1/(1-p) was rounded, bf16 1.109375 at p = 0.1,
    and both gradients came out ~0.2% small.)"""
    torch.manual_seed(4)
    M, K, N, r, p = 256, 64, 32, 8, 0.1
    x, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
    A, B = torch.randn(r, K, dtype=dtype) / 8, torch.randn(N, r, dtype=dtype) / 8
    g = torch.randn(M, N, dtype=dtype)
    seed = torch.tensor([12], dtype=torch.int64)

    def grads(x_grad, A_grad):
        leaves = [x.clone().requires_grad_(x_grad), A.clone().requires_grad_(A_grad)]
        y = ops.linear(leaves[0], w, None, leaves[1], B.clone().requires_grad_(), 2.0, p, "pre", seed)
        wanted = [t for t in leaves if t.requires_grad]
        return dict(zip([i for i, t in enumerate(leaves) if t.requires_grad], torch.autograd.grad(y, wanted, g)))

    both = grads(True, True)
    assert torch.equal(both[1], grads(False, True)[1]), "dA depends on whether x requires grad"
    assert torch.equal(both[0], grads(True, False)[0]), "dx depends on whether lora_A requires grad"


def _assert_kept_fraction(kept: Tensor, p: float) -> None:
    n = kept.numel()
    fraction = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(fraction - (1 - p)) < 6 * sigma, f"kept {fraction:.4f}, expected {1 - p} +- {6 * sigma:.4f}"


def test_dropout_in_eval_style_p_zero_ignores_seed():
    x, weight, bias, lora_A, lora_B = small_inputs(requires_grad=False)
    with_seed = ops.linear(x, weight, bias, lora_A, lora_B, 1.0, 0.0, "pre", torch.tensor([3]))
    without = ops.linear(x, weight, bias, lora_A, lora_B, 1.0)
    torch.testing.assert_close(with_seed, without, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# What forward saves for backward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("x_requires_grad", [True, False], ids=["x_grad", "x_frozen"])
def test_forward_saves_nothing_activation_sized(position, x_requires_grad):
    # Sizes chosen so that M*K, M*N, N*K, r*K, N*r and M*r all differ.
    M, K, N, r = 6, 17, 33, 3
    x, weight, bias, lora_A, lora_B = small_inputs(M=M, K=K, N=N, r=r)
    x = x.detach().reshape(2, 3, K).requires_grad_(x_requires_grad)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.linear(x, weight, bias, lora_A, lora_B, 1.0, 0.5, position)
    y.sum().backward()  # the saved tensors are enough for backward

    assert saved, "forward saved nothing: the hook did not see lora::linear's autograd"
    for t in saved:
        if t.numel() == x.numel():
            assert t.data_ptr() == x.data_ptr() and t.shape == x.shape, "a copy of x (e.g. dropped x) was saved"
        assert t.numel() != M * N, f"an output-sized tensor {tuple(t.shape)} was saved"
    budget = x.numel() + weight.numel() + lora_A.numel() + lora_B.numel() + M * r + 1
    total = sum(t.numel() for t in saved)
    assert total <= budget, f"saved {total} elements ({[tuple(t.shape) for t in saved]}), budget {budget}"


# ---------------------------------------------------------------------------
# Meta device (fake kernels)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_meta_forward_and_backward_shapes(dtype):
    for sample in sample_inputs("meta", requires_grad=True, dtype=dtype):
        y, xa = torch.ops.lora.linear(*sample.op_args())
        M, N, r = math.prod(sample.x.shape[:-1]), sample.lora_B.shape[0], sample.lora_A.shape[0]
        assert y.device.type == "meta" and xa.device.type == "meta"
        assert y.shape == (*sample.x.shape[:-1], N) and y.dtype == dtype, sample
        assert xa.shape == (M, r) and xa.dtype == sample.lora_A.dtype, sample
        inputs = sample.tensors()
        grads = torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))
        for name, grad in zip(inputs, grads):
            assert grad.device.type == "meta"
            assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, f"{sample} {name}"


def test_meta_backward_op_respects_output_mask():
    sample = next(iter(sample_inputs("meta", requires_grad=False)))
    args = backward_args(sample, (False, True, False, True, False))
    grads = torch.ops.lora.linear_backward(*args)
    assert [tuple(g.shape) for g in grads] == [
        (0,), tuple(sample.weight.shape), (0,), tuple(sample.lora_A.shape), (0,)
    ]


def test_meta_output_shape_matches_cpu():
    torch.manual_seed(10)
    for sample in sample_inputs("cpu", requires_grad=False, dtype=torch.float16):
        meta_args = tuple(a.to("meta") if isinstance(a, Tensor) else a for a in sample.op_args())
        y_cpu, xa_cpu = torch.ops.lora.linear(*sample.op_args())
        y_meta, xa_meta = torch.ops.lora.linear(*meta_args)
        for cpu, meta in ((y_cpu, y_meta), (xa_cpu, xa_meta)):
            assert cpu.shape == meta.shape and cpu.dtype == meta.dtype and cpu.stride() == meta.stride(), sample


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument, from the C++ kernel and from the fake kernel
# ---------------------------------------------------------------------------


def _valid_args(device):
    torch.manual_seed(11)
    x, weight, bias, lora_A, lora_B = (t.to(device) for t in small_inputs(M=3, K=5, N=7, r=2, requires_grad=False))
    return dict(
        x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scale=0.5, dropout_p=0.0,
        dropout_position="post", seed=None,
    )


def _bad(**changes):
    """A function of the device giving valid arguments with `changes` (callables of the valid ones) applied."""

    def build(device):
        args = _valid_args(device)
        for name, change in changes.items():
            args[name] = change(args) if callable(change) else change
        return args

    return build


BAD_INPUTS = {
    "lora_A_in_features": (
        _bad(lora_A=lambda a: torch.randn(2, 6, device=a["x"].device)), RuntimeError, r"lora_A\.shape\[1\]"),
    "lora_A_not_2d": (_bad(lora_A=lambda a: a["lora_A"].reshape(-1)), RuntimeError, r"lora_A must be 2-D"),
    "lora_B_out_features": (
        _bad(lora_B=lambda a: torch.randn(8, 2, device=a["x"].device)), RuntimeError, r"lora_B must have shape"),
    "lora_B_rank": (
        _bad(lora_B=lambda a: torch.randn(7, 3, device=a["x"].device)), RuntimeError, r"lora_B must have shape"),
    "weight_in_features": (
        _bad(weight=lambda a: torch.randn(7, 6, device=a["x"].device)), RuntimeError, r"weight\.shape\[1\]"),
    "weight_not_2d": (_bad(weight=lambda a: a["weight"].reshape(-1)), RuntimeError, r"weight must be 2-D"),
    "weight_dtype": (_bad(weight=lambda a: a["weight"].double()), TypeError, r"weight dtype"),
    "bias_shape": (_bad(bias=lambda a: torch.randn(6, device=a["x"].device)), RuntimeError, r"bias must have shape"),
    "bias_dtype": (_bad(bias=lambda a: a["bias"].half()), TypeError, r"bias dtype"),
    "x_int64": (_bad(x=lambda a: torch.ones(3, 5, dtype=torch.int64, device=a["x"].device)), TypeError, r"\bx must"),
    "x_complex": (_bad(x=lambda a: torch.randn(3, 5, dtype=torch.complex64, device=a["x"].device)), TypeError,
                  r"\bx must"),
    "lora_A_int32": (
        _bad(lora_A=lambda a: torch.ones(2, 5, dtype=torch.int32, device=a["x"].device),
             lora_B=lambda a: torch.ones(7, 2, dtype=torch.int32, device=a["x"].device)),
        TypeError, r"lora_A must be float"),
    "lora_dtypes_differ": (_bad(lora_B=lambda a: a["lora_B"].half()), TypeError, r"lora_A .*and lora_B"),
    "x_0dim": (_bad(x=lambda a: torch.tensor(1.0, device=a["x"].device)), RuntimeError, r"\bx must have at least 1"),
    "p_one": (_bad(dropout_p=1.0, seed=lambda a: torch.tensor([1], device=a["x"].device)), ValueError, r"dropout_p"),
    "p_negative": (_bad(dropout_p=-0.1), ValueError, r"dropout_p"),
    "p_nan": (_bad(dropout_p=float("nan")), ValueError, r"dropout_p"),
    "unknown_position": (_bad(dropout_position="middle"), ValueError, r"dropout_position"),
    "dropout_without_seed": (_bad(dropout_p=0.25), RuntimeError, r"seed"),
    "seed_int32": (
        _bad(dropout_p=0.25, seed=lambda a: torch.tensor([1], dtype=torch.int32, device=a["x"].device)),
        TypeError, r"seed must be an int64"),
    "seed_two_elements": (
        _bad(dropout_p=0.25, seed=lambda a: torch.tensor([1, 2], dtype=torch.int64, device=a["x"].device)),
        TypeError, r"seed must be an int64 tensor with one element"),
}


def _call_linear(args):
    return torch.ops.lora.linear(
        args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], args["scale"], args["dropout_p"],
        args["dropout_position"], args["seed"],
    )


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case, device):
    build, error_type, message = BAD_INPUTS[case]
    with pytest.raises(error_type, match=message):
        _call_linear(build(device))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name", ["weight", "bias", "lora_A", "lora_B", "seed"])
def test_tensors_on_different_devices_raise(name, device):
    other = "meta" if device == "cpu" else "cpu"
    args = _valid_args(device)
    if name == "seed":
        args["dropout_p"] = 0.25
        args["seed"] = torch.tensor([1], dtype=torch.int64)
    moved = args[name]
    args[name] = torch.ones(moved.shape, dtype=moved.dtype, device=other)  # meta tensors cannot be copied
    with pytest.raises(RuntimeError, match=rf"{name} is on .* but x is on"):
        _call_linear(args)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        "meta",
    ],
)
def test_unknown_backend_raises(device):
    args = _valid_args(device)
    with pytest.raises(ValueError, match="backend"):
        torch.ops.lora.linear(
            args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 0.5, 0.0, "post", None, "bogus"
        )


def test_wrapper_rejects_p_outside_range_before_drawing_a_seed():
    args = _valid_args("cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        ops.linear(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 0.5, 1.5)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_linear_backward_bad_input(device):
    args = _valid_args(device)
    x, weight, lora_A, lora_B = args["x"], args["weight"], args["lora_A"], args["lora_B"]
    grad_y = torch.randn(3, 7, device=device)
    xa = torch.randn(3, 2, device=device)
    mask = [True] * 5
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        torch.ops.lora.linear_backward(torch.randn(3, 8, device=device), x, weight, lora_A, lora_B, xa, 0.5, 0.0,
                                       "post", None, mask)
    with pytest.raises(RuntimeError, match="xa must have shape"):
        torch.ops.lora.linear_backward(grad_y, x, weight, lora_A, lora_B, torch.randn(3, 3, device=device), 0.5,
                                       0.0, "post", None, mask)
    with pytest.raises(RuntimeError, match="grad of weight requested but weight is None"):
        torch.ops.lora.linear_backward(grad_y, x, None, lora_A, lora_B, xa, 0.5, 0.0, "post", None, mask)
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.lora.linear_backward(grad_y, x, weight, lora_A, lora_B, xa, 0.5, 0.25, "post", None, mask)


# ---------------------------------------------------------------------------
# Registration: schema and CPU kernel come from C++
# ---------------------------------------------------------------------------


def test_cpu_kernels_registered_in_cpp():
    for op in ("lora::linear", "lora::linear_backward", "lora::post_dropout_grad_y",
               "lora::linear_backward_from_grad_xa"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta"), op  # the fake kernel
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd"), op


def test_schema_defined_by_the_extension_alone():
    # Load only the compiled extension (not the lora_ext package, whose ops.py adds the Python
    # registrations): the schemas and the CPU kernels must already be there.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("lora_ext._C", {lora_ext._C.__file__!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert "lora_ext" not in sys.modules and "lora_ext.ops" not in sys.modules
        for op in ("lora::linear", "lora::linear_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta"), op
        print(torch.ops.lora.linear.default._schema)
        print(torch.ops.lora.linear_backward.default._schema)
        x = torch.randn(2, 3)
        y, xa = torch.ops.lora.linear(x, None, None, torch.randn(1, 3), torch.randn(4, 1), 1.0)
        assert y.shape == (2, 4) and xa.shape == (2, 1)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    linear_schema, backward_schema = result.stdout.strip().splitlines()
    assert linear_schema.startswith("lora::linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A")
    assert "float dropout_p=0." in linear_schema and "Tensor? seed=None" in linear_schema
    assert backward_schema.startswith("lora::linear_backward(Tensor grad_y")
    assert "bool[5] output_mask" in backward_schema


# The native CUDA path's switches (csrc/lora_aten.cpp): (variable, value that flips it, default). The
# first four were measured on the H200 and are on by default (benchmarks/NOTES.md #26-#28, #39), the
# few-token fused forward on an H100 and the H200 (#44, #48). Each variable is read once, when the extension
# loads.
SWITCH_DEFAULTS = {"set_fused_forward": ("LORA_EXT_FUSED_FORWARD", "0", True),
                   "set_fused_grad_input": ("LORA_EXT_FUSED_GRAD_INPUT", "0", True),
                   "set_fused_adapter_grads": ("LORA_EXT_FUSED_ADAPTER_GRADS", "0", True),
                   "set_fused_post_dropout": ("LORA_EXT_FUSED_POST_DROPOUT", "0", True),
                   "set_fused_small_m_forward": ("LORA_EXT_FUSED_SMALL_M_FORWARD", "0", True)}


def test_native_path_switches_default_and_env():
    lines = "\n".join(
        f"print(lora_ext._C.{name}(True), lora_ext._C.{name}(False), lora_ext._C.{name}(True))"
        for name in SWITCH_DEFAULTS)
    script = f"import lora_ext\n{lines}\n"
    variables = {var for var, _, _ in SWITCH_DEFAULTS.values()}
    clean = {k: v for k, v in os.environ.items() if k not in variables}
    flipped = {**clean, **{var: value for var, value, _ in SWITCH_DEFAULTS.values()}}
    for env, flip in ((clean, False), (flipped, True)):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                env={**env, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        for (name, (_, _, default)), line in zip(SWITCH_DEFAULTS.items(), result.stdout.split("\n")):
            # each call returns the setting before it: the loaded one, then True, then False
            assert line.split() == [str(default != flip), "True", "False"], (name, flip, line)


def test_adapter_grads_any_width_rank_setter():
    """set_fused_adapter_grads_any_width_max_rank: 16 by default, returns the previous value, and names
    itself and the range for a value outside [0, 64] (leaving the setting as it was). Its effect on
    which kernels run is a GPU test (test_cuda.py test_adapter_grads_width_rule)."""
    setter = lora_ext._C.set_fused_adapter_grads_any_width_max_rank
    previous = setter(64)
    try:
        assert previous == 16
        assert setter(0) == 64
        for bad in (-1, 65):
            with pytest.raises(RuntimeError, match=r"set_fused_adapter_grads_any_width_max_rank: rank must be in \[0, 64\]"):
                setter(bad)
        assert setter(0) == 0
    finally:
        setter(previous)


def test_adapter_grads_memory_budget_setter():
    """set_adapter_grads_memory_budget: the issue's 1 MiB by default, returns the previous value, and names
    itself and what it takes for a negative value (leaving the setting as it was). Its effect (two
    launches, grad_xa freed before dB) is a GPU test (test_cuda.py test_adapter_grads_apart_free_grad_xa_before_dB)."""
    setter = lora_ext._C.set_adapter_grads_memory_budget
    previous = setter(0)
    try:
        assert previous == 1 << 20
        with pytest.raises(RuntimeError, match=r"set_adapter_grads_memory_budget: bytes must be >= 0, got -1"):
            setter(-1)
        assert setter(5) == 0
    finally:
        setter(previous)


def test_terminate_backtrace_is_printed_only_when_asked():
    """LORA_EXT_TERMINATE_BACKTRACE=1: a std::terminate (here called through ctypes) prints the C++
    stack before the handler it replaced aborts; without it, only the usual message."""
    script = "import ctypes, lora_ext\nctypes.CDLL('libstdc++.so.6')._ZSt9terminatev()\n"
    header = "lora_ext: std::terminate called; C++ stack"
    for asked in (True, False):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("LORA_EXT_TERMINATE_BACKTRACE", None)
        if asked:
            env["LORA_EXT_TERMINATE_BACKTRACE"] = "1"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode != 0 and "terminate called without an active exception" in result.stderr
        assert (header in result.stderr) == asked, result.stderr
        if asked:  # the stack names the frames it passed through
            assert "libstdc++" in result.stderr and "_C." in result.stderr, result.stderr



# ---------------------------------------------------------------------------
# How the native 'post' backward step splits its work (csrc/masked_grad_y_grid.h). Host arithmetic,
# in every build: checked here against a search of every split; the kernel's results under both rules
# are GPU tests (test_cuda.py test_native_masked_grad_y_grid_rules).
# ---------------------------------------------------------------------------

def _best_split_by_search(M, C, r, slots, cap):
    """The balanced rule's answer by brute force: over every (row blocks, column blocks) per program
    with at most `slots` programs and partials within `cap`, the fewest tiles in the longest program
    (fewer than two counted as two), then the smaller partials, then fewer column blocks per program."""
    r_pad = 16 if r <= 16 else (32 if r <= 32 else 64)
    m_blocks, c_blocks = -(-M // 64), -(-C // 128)
    best = None
    for a in range(1, m_blocks + 1):
        for b in range(1, c_blocks + 1):
            m_groups, c_groups = -(-m_blocks // a), -(-c_blocks // b)
            if m_groups * c_groups > slots:
                continue
            a_used, b_used = -(-m_blocks // m_groups), -(-c_blocks // c_groups)
            partial = (c_groups * m_blocks * 64 + m_groups * c_blocks * 128) * r_pad * 4
            if partial > cap:
                continue
            key = (max(a_used * b_used, 2), partial, b_used)
            best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("M,C,r,slots,cap", [
    (8192, 4096, 16, 264, 8192 * 4096 * 2),     # q/o at 8192 tokens, two programs per SM on 132 SMs
    (8192, 1024, 16, 264, 8192 * 4096 * 2),     # k/v
    (8192, 14336, 16, 264, 8192 * 4096 * 2),    # gate/up
    (8192, 4096, 64, 132, 8192 * 14336 * 2),    # down at r = 64, one program per SM
    (4096, 5632, 16, 264, 4096 * 2048 * 2),     # the end-to-end model's gate/up
    (4096, 32000, 16, 264, 4096 * 2048 * 2),    # its lm_head: dx (16 MiB) is below the first rule's partials
    (1000, 4104, 33, 132, 0), (63, 136, 3, 264, 0), (1, 8, 1, 7, 0), (2048, 8200, 16, 264, 0),
    (130000, 8, 16, 132, 0),                    # many rows, one column block
    (2**22, 1024, 16, 264, 2**22 * 4096 * 2),   # 65 536 row blocks: the search runs over the slots, not the blocks
    (64, 76800, 16, 3, 10**12),                 # few slots, many column blocks
    (4096, 512, 16, 264, 4096 * 2048 * 2),      # the end-to-end k/v: fewer tiles than twice the slots
    (200, 264, 16, 264, 0),                     # a few tiles, many slots
], ids=str)
def test_masked_grad_y_grid_is_the_best_split(M, C, r, slots, cap):
    grid = lora_ext._C.masked_grad_y_grid(M, C, r, slots, cap)
    first = lora_ext._C.masked_grad_y_grid(M, C, r, slots, 0, "sqrt")
    m_blocks, c_blocks = -(-M // 64), -(-C // 128)
    for rule, g in (("balanced", grid), ("sqrt", first)):
        # Every block in exactly one group, no group empty.
        assert g["m_groups"] * g["blocks_m_per_group"] >= m_blocks > (g["m_groups"] - 1) * g["blocks_m_per_group"], (rule, g)
        assert g["c_groups"] * g["blocks_c_per_group"] >= c_blocks > (g["c_groups"] - 1) * g["blocks_c_per_group"], (rule, g)
    assert grid["m_groups"] * grid["c_groups"] <= slots, grid
    cap_used = max(cap, first["partial_bytes"])
    assert grid["partial_bytes"] <= cap_used, (grid, cap_used)
    tiles = grid["blocks_m_per_group"] * grid["blocks_c_per_group"]
    key = (max(tiles, 2), grid["partial_bytes"], grid["blocks_c_per_group"])
    assert key == _best_split_by_search(M, C, r, slots, cap_used), grid
    # Where the first rule's grid fits the slots, the balanced one is never longer (nor shorter than two
    # tiles where the first rule's programs had two or more).
    first_tiles = first["blocks_m_per_group"] * first["blocks_c_per_group"]
    if first["m_groups"] * first["c_groups"] <= slots:
        assert key[0] <= max(first_tiles, 2), (grid, first)
    assert tiles >= min(first_tiles, 2), (grid, first)


def test_masked_grad_y_grid_is_the_best_split_on_random_sizes():
    """The same search against brute force on 300 random sizes, slot counts and caps (a fixed seed)."""
    rng = np.random.default_rng(56)
    for _ in range(300):
        M, C = int(rng.integers(1, 3000)), int(rng.integers(1, 400)) * 8
        r, slots = int(rng.integers(1, 65)), int(rng.integers(1, 300))
        cap = int(rng.choice([0, int(rng.integers(0, 2**24)), 10**12]))
        grid = lora_ext._C.masked_grad_y_grid(M, C, r, slots, cap)
        first = lora_ext._C.masked_grad_y_grid(M, C, r, slots, 0, "sqrt")
        cap_used = max(cap, first["partial_bytes"])
        best = _best_split_by_search(M, C, r, slots, cap_used)
        tiles = grid["blocks_m_per_group"] * grid["blocks_c_per_group"]
        assert best is not None  # one program always fits the slots and the cap
        assert grid["m_groups"] * grid["c_groups"] <= slots and grid["partial_bytes"] <= cap_used
        assert (max(tiles, 2), grid["partial_bytes"], grid["blocks_c_per_group"]) == best, (M, C, r, slots, cap)


def test_masked_grad_y_grid_numbers_and_bad_arguments():
    """The splits NOTES.md #56 predicts from (132 SMs, two programs each at r = 16), and clear errors."""
    grid = lora_ext._C.masked_grad_y_grid
    first = grid(8192, 4096, 16, 264, 0, "sqrt")
    assert (first["m_groups"], first["c_groups"], first["blocks_m_per_group"], first["blocks_c_per_group"]) == (22, 11, 6, 3)
    qo = grid(8192, 4096, 16, 264, 8192 * 4096 * 2)
    assert (qo["blocks_m_per_group"], qo["blocks_c_per_group"], qo["m_groups"] * qo["c_groups"]) == (8, 2, 256)
    kv = grid(8192, 1024, 16, 264, 8192 * 4096 * 2)
    assert (kv["blocks_m_per_group"], kv["blocks_c_per_group"], kv["m_groups"] * kv["c_groups"]) == (4, 1, 256)
    # The end-to-end model's k/v (4096 x 512): 256 tiles would fill 256 one-tile programs; two-tile
    # programs, 128 of them, measured faster (NOTES.md #56).
    e2e_kv = grid(4096, 512, 16, 264, 4096 * 2048 * 2)
    assert (e2e_kv["blocks_m_per_group"], e2e_kv["blocks_c_per_group"], e2e_kv["m_groups"] * e2e_kv["c_groups"]) == (2, 1, 128)
    for args, message in (((0, 8, 16, 264), "M, C and slots > 0"), ((8, 8, 65, 264), r"r in \[1, 64\]"),
                          ((8, 8, 16, 0), "M, C and slots > 0")):
        with pytest.raises(RuntimeError, match=message):
            grid(*args)
    with pytest.raises(RuntimeError, match="rule is 'balanced' or 'sqrt', got 'square'"):
        grid(8, 8, 16, 264, 0, "square")
