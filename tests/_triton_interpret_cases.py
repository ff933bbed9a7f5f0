"""The Triton kernels of lora_ext on CPU tensors, run by triton's interpreter.

Not collected by the main pytest session (the name does not start with test_):
tests/test_triton_interpret.py runs this file in a subprocess with TRITON_INTERPRET=1
in its environment, because the variable must be set before triton is imported.

Every output and gradient of lora_ext.kernels.triton_lora is compared with the float64
reference (lora_ext.reference), with an error bound scaled by the error of the CPU op
(torch.ops.lora.*) in the same dtypes: |triton - ref| <= 2 |cpu_op - ref| + eps * max|ref|.
The interpreter's bfloat16 arithmetic is wrong, so only float32/float16 run here.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (run via test_triton_interpret.py)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import lora_ext  # noqa: E402,F401  (registers torch.ops.lora.*)
from lora_ext.kernels import philox, triton_lora  # noqa: E402
from lora_ext.reference import dropout_keep_mask, lora_linear_reference, philox_mask_bits  # noqa: E402

GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
# Slack added to the bound, relative to max |reference|, by the least precise dtype involved.
EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.float64: 1e-12}
SCALE = 0.75


def least_precise(*dtypes):
    order = [torch.float64, torch.float32, torch.float16]
    return max(dtypes, key=order.index)


def make_inputs(lead_shape, K, N, r, dtype, lora_dtype=None, bias=True, weight=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype

    def randn(*shape, dt, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt)

    return dict(
        x=randn(*lead_shape, K, dt=dtype),
        weight=randn(N, K, dt=dtype, std=1 / math.sqrt(max(K, 1))) if weight else None,
        bias=randn(N, dt=dtype) if bias else None,
        lora_A=randn(r, K, dt=lora_dtype, std=1 / math.sqrt(max(K, 1))),
        lora_B=randn(N, r, dt=lora_dtype, std=1 / math.sqrt(r)),
    )


def seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64)


def expected_xa(x, lora_A, p, position, seed):
    """xa = drop_pre(x) A^T in float64 (the op's second output)."""
    K = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), K).double()  # reshape(-1, 0) is ambiguous when K == 0
    if p > 0 and position == "pre":
        x2 = x2 * dropout_keep_mask(int(seed.item()), x2.shape[0], K, p).double() / (1 - p)
    return x2 @ lora_A.double().t()


def assert_within_bound(actual, reference, same_dtype, dtype, what):
    """|actual - reference| <= 2 |same_dtype - reference| + eps(dtype) * max|reference|."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    if reference.numel() == 0:
        return
    err = (actual.double() - reference).abs().max().item()
    base = (same_dtype.double() - reference).abs().max().item()
    slack = EPS[dtype] * max(reference.abs().max().item(), 1e-3)
    assert err <= 2 * base + slack, f"{what}: error {err:.3g} > 2 * {base:.3g} (CPU op) + {slack:.3g}"


def reference_grads(inputs, grad_y, p, position, seed):
    """Gradients of the float64 reference w.r.t. every tensor input that is present."""
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y = lora_linear_reference(leaves["x"], leaves.get("weight"), leaves.get("bias"), leaves["lora_A"],
                              leaves["lora_B"], SCALE, p, position, seed)
    y.backward(grad_y.double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def run_case(inputs, p=0.0, position="post", seed_value=1234, output_mask=None):
    """Forward and backward through Triton, the CPU op and the reference; checks every output."""
    seed = seed_tensor(seed_value) if p > 0 else None
    x, weight, bias, lora_A, lora_B = (inputs[k] for k in GRAD_NAMES)
    dtype = least_precise(x.dtype, lora_A.dtype)

    y, xa = triton_lora.linear_forward(x, weight, bias, lora_A, lora_B, SCALE, p, position, seed)
    y_cpu, xa_cpu = torch.ops.lora.linear(x, weight, bias, lora_A, lora_B, SCALE, p, position, seed)
    gen = torch.Generator().manual_seed(99)
    grad_y = torch.randn(y_cpu.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    y_ref, grads_ref = reference_grads(inputs, grad_y, p, position, seed)

    assert y.dtype == x.dtype and xa.dtype == lora_A.dtype
    assert_within_bound(y, y_ref, y_cpu, dtype, "y")
    assert_within_bound(xa, expected_xa(x, lora_A, p, position, seed), xa_cpu, dtype, "xa")

    mask = output_mask or [True, weight is not None, bias is not None, True, True]
    grads = triton_lora.linear_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALE, p, position, seed, mask)
    grads_cpu = torch.ops.lora.linear_backward(grad_y, x, weight, lora_A, lora_B, xa_cpu, SCALE, p, position,
                                               seed, mask)
    for name, needed, g, g_cpu in zip(GRAD_NAMES, mask, grads, grads_cpu):
        expected_dtype = lora_A.dtype if name.startswith("lora") else x.dtype
        assert g.dtype == expected_dtype, f"grad {name}: dtype {g.dtype}, expected {expected_dtype}"
        if not needed:
            assert g.shape == (0,), f"grad {name} not requested but has shape {tuple(g.shape)}"
            continue
        assert_within_bound(g, grads_ref[name], g_cpu, dtype, f"grad {name}")
    return y, xa, grads


# ---------------------------------------------------------------------------
# The Philox mask
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed_value", [0, 7, 2**62 - 1, -3, 2**33 + 5])
def test_keep_mask_matches_reference(seed_value):
    mask = philox.dropout_keep_mask(seed_tensor(seed_value), 19, 37, 0.3)
    assert torch.equal(mask, dropout_keep_mask(seed_value, 19, 37, 0.3))


@pytest.mark.parametrize("first_index", [2**31 - 40, 2**32 - 40, 2**35 - 40, 9 * 2**32 + 11])
def test_keep_mask_high_counter_word(first_index):
    """Indices past 2**31, 2**32 and 2**35 (group index 2**32: the counter's high word) match the numpy Philox."""
    import numpy as np

    seed_value = 987654321987
    mask = philox.keep_mask_range(seed_tensor(seed_value), first_index, 80, 0.5)
    index = np.arange(first_index, first_index + 80, dtype=np.uint64)
    expected = philox_mask_bits(seed_value, index) >= np.uint64(philox.dropout_threshold(0.5))
    assert np.array_equal(mask.numpy(), expected)


@triton.jit
def _keep_tile_kernel(out_ptr, seed_ptr, M, C, threshold, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      GROUP_COLUMNS: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_first = tl.program_id(1).to(tl.int64) * BLOCK_C
    c = c_first + tl.arange(0, BLOCK_C)
    key_lo, key_hi = philox.load_seed_words(seed_ptr)
    keep = philox.dropout_keep_tile(key_lo, key_hi, m, c_first, C, threshold, BLOCK_M, BLOCK_C, GROUP_COLUMNS)
    tl.store(out_ptr + m[:, None] * C + c[None, :], keep.to(tl.uint8), mask=(m[:, None] < M) & (c[None, :] < C))


@pytest.mark.parametrize("group_columns,C", [(8, 48), (4, 48), (4, 36), (0, 37)])
def test_keep_tile_every_grouping_matches_reference(group_columns, C):
    """dropout_keep_tile's three ways to spread Philox words over a tile (one evaluation per
    eight elements, per four, per element) give the reference mask, partial tiles included."""
    M, seed_value, p = 21, 4321, 0.4
    out = torch.zeros(M, C, dtype=torch.uint8)
    grid = (triton.cdiv(M, 8), triton.cdiv(C, 16))
    _keep_tile_kernel[grid](out, seed_tensor(seed_value), M, C, philox.dropout_threshold(p), BLOCK_M=8, BLOCK_C=16,
                            GROUP_COLUMNS=group_columns)
    assert torch.equal(out.bool(), dropout_keep_mask(seed_value, M, C, p))


# ---------------------------------------------------------------------------
# Forward and backward vs the reference and the CPU op
# ---------------------------------------------------------------------------

CASES = [
    # (lead shape, K, N, r, dtype, lora dtype, bias, weight, dropout p, position)
    ((7,), 17, 40, 3, torch.float32, None, True, True, 0.0, "post"),
    ((33,), 40, 17, 16, torch.float32, None, False, True, 0.0, "post"),
    ((1,), 5, 5, 1, torch.float32, None, True, True, 0.0, "post"),
    ((33,), 40, 17, 3, torch.float16, None, True, True, 0.0, "post"),
    ((33,), 40, 17, 3, torch.float32, None, True, True, 0.5, "pre"),
    ((33,), 17, 40, 3, torch.float32, None, True, True, 0.5, "post"),
    ((33,), 40, 40, 16, torch.float16, None, True, True, 0.25, "pre"),
    ((33,), 40, 40, 1, torch.float16, None, False, True, 0.25, "post"),
    ((3, 11), 17, 5, 3, torch.float16, torch.float32, True, True, 0.0, "post"),
    ((3, 11), 17, 5, 3, torch.float16, torch.float32, True, True, 0.3, "pre"),
    ((3, 11), 40, 17, 3, torch.float16, torch.float32, False, True, 0.3, "post"),
    ((33,), 40, 17, 3, torch.float32, torch.float16, True, True, 0.0, "post"),
    ((7,), 17, 40, 3, torch.float32, None, True, False, 0.0, "post"),
    ((7,), 17, 40, 3, torch.float32, None, False, False, 0.4, "post"),
    ((2, 2, 5), 5, 17, 3, torch.float32, None, True, True, 0.0, "post"),
    ((), 40, 17, 3, torch.float32, None, True, True, 0.3, "pre"),
    ((5,), 0, 7, 3, torch.float32, None, True, True, 0.3, "pre"),  # K = 0
    ((5,), 7, 0, 3, torch.float32, None, True, True, 0.3, "post"),  # N = 0
    ((3,), 40, 5, 300, torch.float32, None, True, True, 0.3, "post"),  # rank > 256: the composition
]


@pytest.mark.parametrize("lead_shape,K,N,r,dtype,lora_dtype,bias,weight,p,position", CASES,
                         ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_backward_matches_reference(lead_shape, K, N, r, dtype, lora_dtype, bias, weight, p, position):
    inputs = make_inputs(lead_shape, K, N, r, dtype, lora_dtype, bias=bias, weight=weight)
    y, xa, _ = run_case(inputs, p, position)
    assert y.shape == (*lead_shape, N)
    assert xa.shape == (math.prod(lead_shape), r)


def test_down_blocks_keep_the_tiles_stage_count(monkeypatch):
    """_down_blocks shrinks the row block for small M but keeps every other field of the tile
    (masked_pieces.py's sweep sets warps and stages through _tile; the stage count was dropped)."""
    monkeypatch.setattr(triton_lora, "_INTERPRET", False)
    monkeypatch.setattr(triton_lora, "_tile", lambda tiles, r_pad, dropout, fp32: triton_lora._Blocks(64, 128, 8, 5))
    for panel_grad in (False, True):
        blocks = triton_lora._down_blocks(256, 16, panel_grad, True, False, programs_wanted=132)
        assert (blocks.block_c, blocks.num_warps, blocks.num_stages) == (128, 8, 5), panel_grad
    assert triton_lora._down_blocks(256, 16, False, True, False, programs_wanted=132).block_m == 16


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reduction_pass_with_several_row_and_column_blocks_per_program(monkeypatch, p):
    """A shape whose one pass over dY (_lora_down_reduce_kernel) gives its programs several
    row blocks (dB accumulated in registers across them) and several column blocks (dxa's
    float32 partial read-added-written across them), with and without post dropout."""
    M, K, N, r = 70, 17, 200, 3
    budget = triton_lora.MASK_REUSE_BUDGET_BYTES if p > 0 else triton_lora.PARTIAL_BUDGET_BYTES
    plan = triton_lora._down_plan(M, N, r, torch.device("cpu"), True, True, p > 0, torch.float32, budget)
    assert plan.m_per_group > 1 and plan.c_per_group > 1, plan
    calls = []
    original = triton_lora._lora_down
    monkeypatch.setattr(triton_lora, "_lora_down", lambda *a, **k: calls.append(k) or original(*a, **k))
    run_case(make_inputs((M,), K, N, r, torch.float32), p, "post")
    # The forward's xa, then the backward's one pass for both dxa and dB.
    assert len(calls) == 2 and calls[1].get("rows") is not None and calls[1].get("need_out", True), calls


@pytest.mark.parametrize("position", ["pre", "post"])
def test_two_passes_over_grad_y_when_partials_exceed_the_budget(monkeypatch, position):
    """With no partial budget, dxa and dB come from two passes over dY (and dA from one split)."""
    monkeypatch.setattr(triton_lora, "PARTIAL_BUDGET_BYTES", 0)
    monkeypatch.setattr(triton_lora, "MASK_REUSE_BUDGET_BYTES", 0)
    calls = []
    original = triton_lora._lora_down
    monkeypatch.setattr(triton_lora, "_lora_down", lambda *a, **k: calls.append(k) or original(*a, **k))
    run_case(make_inputs((70,), 40, 17, 3, torch.float32), 0.3, position)
    # The forward's xa, then the backward's two passes.
    assert len(calls) == 3 and calls[2].get("need_out") is False, calls


@pytest.mark.parametrize("output_mask", [
    [True, False, False, False, False],
    [False, False, False, True, False],
    [False, False, False, False, True],
    [False, True, True, False, False],
    [True, False, True, True, True],
])
def test_output_mask_subsets(output_mask):
    inputs = make_inputs((9,), 17, 40, 3, torch.float32)
    run_case(inputs, 0.3, "pre", output_mask=output_mask)


# ---------------------------------------------------------------------------
# Layouts, sizes, determinism, float64, errors
# ---------------------------------------------------------------------------


def test_non_contiguous_inputs():
    inputs = make_inputs((33,), 80, 17, 3, torch.float32)
    inputs["x"] = inputs["x"][:, ::2]  # column stride 2
    inputs["lora_A"] = inputs["lora_A"][:, ::2].t().contiguous().t()  # column-major adapter
    inputs["lora_B"] = inputs["lora_B"].t().contiguous().t()
    inputs["weight"] = inputs["weight"][:, ::2]
    inputs["bias"] = torch.stack([inputs["bias"], -inputs["bias"]], dim=1)[:, 0]  # stride 2
    assert not inputs["x"].is_contiguous() and not inputs["lora_A"].is_contiguous()
    assert inputs["bias"].stride() == (2,)
    run_case(inputs, 0.3, "pre")


def test_broadcast_inputs():
    """Stride-0 rows (an expanded x) and an expanded 3-D x, which reshape must copy."""
    inputs = make_inputs((1,), 17, 40, 3, torch.float32)
    inputs["x"] = inputs["x"].expand(9, 17)
    run_case(inputs, 0.3, "post")
    inputs = make_inputs((1, 4), 17, 5, 3, torch.float32)
    inputs["x"] = inputs["x"].expand(3, 4, 17)
    run_case(inputs, 0.0, "post")


@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)])
def test_zero_tokens(lead_shape):
    inputs = make_inputs(lead_shape, 17, 5, 3, torch.float32)
    y, xa, grads = run_case(inputs, 0.3, "pre")
    assert y.shape == (*lead_shape, 5) and xa.shape == (0, 3)
    assert torch.equal(grads[3], torch.zeros(3, 17)) and torch.equal(grads[4], torch.zeros(5, 3))


def test_same_seed_bitwise_equal_and_seed_matters():
    inputs = make_inputs((33,), 40, 17, 3, torch.float32)
    args = [inputs[k] for k in GRAD_NAMES]
    y1, xa1 = triton_lora.linear_forward(*args, SCALE, 0.5, "post", seed_tensor(5))
    y2, xa2 = triton_lora.linear_forward(*args, SCALE, 0.5, "post", seed_tensor(5))
    y3, _ = triton_lora.linear_forward(*args, SCALE, 0.5, "post", seed_tensor(6))
    assert torch.equal(y1, y2) and torch.equal(xa1, xa2)
    assert not torch.equal(y1, y3)
    grad_y = torch.randn_like(y1)
    g1 = triton_lora.linear_backward(grad_y, args[0], args[1], args[3], args[4], xa1, SCALE, 0.5, "post",
                                     seed_tensor(5), [True, True, True, True, True])
    g2 = triton_lora.linear_backward(grad_y, args[0], args[1], args[3], args[4], xa1, SCALE, 0.5, "post",
                                     seed_tensor(5), [True, True, True, True, True])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("p,position,lora_dtype", [(0.0, "post", None), (0.3, "pre", None),
                                                   (0.3, "post", torch.float32)])
def test_float64_falls_back_to_the_composition(p, position, lora_dtype):
    """float64 runs the torch composition of lora_aten.cpp: it equals the CPU op."""
    inputs = make_inputs((2, 9), 17, 5, 3, torch.float64, lora_dtype)
    seed = seed_tensor(77) if p > 0 else None
    args = [inputs[k] for k in GRAD_NAMES]
    y, xa = triton_lora.linear_forward(*args, SCALE, p, position, seed)
    y_cpu, xa_cpu = torch.ops.lora.linear(*args, SCALE, p, position, seed)
    torch.testing.assert_close(y, y_cpu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa, xa_cpu, rtol=1e-6, atol=1e-6)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    mask = [True, True, True, True, True]
    grads = triton_lora.linear_backward(grad_y, args[0], args[1], args[3], args[4], xa, SCALE, p, position, seed,
                                        mask)
    grads_cpu = torch.ops.lora.linear_backward(grad_y, args[0], args[1], args[3], args[4], xa_cpu, SCALE, p,
                                               position, seed, mask)
    # With float32 adapters the LoRA path runs in float32 on both sides, in a different order
    # (the C++ op folds the scale into the GEMM's alpha): dA and dB are sums over tokens of
    # terms up to ~10 that cancel, so they agree to float32 rounding of those terms (~1e-6
    # absolute), not to 1e-6 relative. float64 throughout agrees to float64 rounding.
    tol = 1e-5 if lora_dtype == torch.float32 else 1e-10
    for g, g_cpu in zip(grads, grads_cpu):
        torch.testing.assert_close(g, g_cpu, rtol=tol, atol=tol)


def test_bad_arguments_raise_the_ops_errors():
    inputs = make_inputs((3,), 17, 5, 3, torch.float32)
    with pytest.raises(RuntimeError, match="lora_A.shape"):
        triton_lora.linear_forward(inputs["x"], inputs["weight"], None, inputs["lora_A"][:, :5], inputs["lora_B"],
                                   SCALE)
    with pytest.raises(RuntimeError, match="needs a seed"):
        triton_lora.linear_forward(inputs["x"], inputs["weight"], None, inputs["lora_A"], inputs["lora_B"], SCALE,
                                   0.1, "post", None)
    y, xa = triton_lora.linear_forward(inputs["x"], inputs["weight"], None, inputs["lora_A"], inputs["lora_B"], SCALE)
    with pytest.raises(RuntimeError, match="xa must have shape"):
        triton_lora.linear_backward(torch.ones_like(y), inputs["x"], inputs["weight"], inputs["lora_A"],
                                    inputs["lora_B"], xa[:, :2], SCALE, 0.0, "post", None, [True] * 5)


# The masked thin products the native CUDA path uses for its dropout steps
# (triton_lora.masked_*; csrc/lora_aten.cpp calls them through the C++ bridge on CUDA).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M, K, N, r", [(37, 29, 23, 5), (1, 130, 7, 16), (70, 3, 65, 1), (37, 68, 44, 5)])
def test_masked_pieces_of_the_native_path_match_float64(M, K, N, r, dtype):
    gen = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=gen).to(dtype)
    g = torch.randn(M, N, generator=gen).to(dtype)
    A = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(dtype)
    B = (torch.randn(N, r, generator=gen) / math.sqrt(r)).to(dtype)
    p, scale, seed = 0.3, 0.7, seed_tensor(2024)
    keep = 1.0 / (1.0 - p)
    mask_x = dropout_keep_mask(seed, M, K, p).double() * keep
    mask_g = dropout_keep_mask(seed, M, N, p).double() * keep
    x64, g64, A64, B64 = (t.double() for t in (x, g, A, B))
    xa = (x64 @ A64.t()).to(dtype)
    eps = EPS[dtype]

    def close(actual, expected, what):
        bound = eps * 4 * max(expected.abs().max().item(), 1.0)
        err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
        assert actual.shape == expected.shape and err <= bound, f"{what}: error {err} > {bound}"

    close(triton_lora.masked_down(x, A, seed, p), (x64 * mask_x) @ A64.t(), "xa = drop(x) A^T")
    grad_xa, grad_B = triton_lora.masked_grad_y(g, B, xa, scale, seed, p, True, True)
    close(grad_xa, scale * (g64 * mask_g) @ B64, "dxa = s drop(dY) B")
    close(grad_B, scale * (g64 * mask_g).t() @ xa.double(), "dB = s drop(dY)^T xa")
    only_B = triton_lora.masked_grad_y(g, B, xa, scale, seed, p, False, True)
    assert only_B[0].numel() == 0
    torch.testing.assert_close(only_B[1], grad_B, rtol=0, atol=0)
    grad_x, grad_A = triton_lora.masked_up(grad_xa, A, x, seed, p, True, True)
    close(grad_x, (grad_xa.double() @ A64) * mask_x, "dx_lora = drop(dxa A)")
    close(grad_A, grad_xa.double().t() @ (x64 * mask_x), "dA = dxa^T drop(x)")
    only_A = triton_lora.masked_up(grad_xa, A, x, seed, p, False, True)
    assert only_A[0].numel() == 0
    torch.testing.assert_close(only_A[1], grad_A, rtol=0, atol=0)


@pytest.mark.parametrize("N, r, passes", [(64, 40, 2), (64, 16, 1), (48, 40, 1)])
def test_masked_grad_y_over_wide_grad_y_at_large_rank_takes_two_passes(monkeypatch, N, r, passes):
    """'post' dropout, r > 32, dY at least WIDE_MASKED_TWO_PASSES_COLUMNS wide (lowered here to 64
    so the interpreter runs it): one pass per reduction (measured faster on the H200 at 4096 x 14336,
    r = 64), else one pass for both; the same numbers either way, within the float64 bound."""
    monkeypatch.setattr(triton_lora, "WIDE_MASKED_TWO_PASSES_COLUMNS", 64)
    calls = []
    lora_down = triton_lora._lora_down
    monkeypatch.setattr(triton_lora, "_lora_down", lambda *a, **k: calls.append(1) or lora_down(*a, **k))
    gen = torch.Generator().manual_seed(N + r)
    M, p, scale, seed = 40, 0.3, 0.7, seed_tensor(9)
    g = torch.randn(M, N, generator=gen).to(torch.float16)
    B = (torch.randn(N, r, generator=gen) / math.sqrt(r)).to(torch.float16)
    xa = torch.randn(M, r, generator=gen).to(torch.float16)
    grad_xa, grad_B = triton_lora.masked_grad_y(g, B, xa, scale, seed, p, True, True)
    assert len(calls) == passes
    dropped = g.double() * dropout_keep_mask(seed, M, N, p).double() / (1 - p)
    for actual, expected, what in ((grad_xa, scale * dropped @ B.double(), "dxa"),
                                   (grad_B, scale * dropped.t() @ xa.double(), "dB")):
        err = (actual.double() - expected).abs().max().item()
        assert err <= EPS[torch.float16] * 4 * expected.abs().max().item(), f"{what}: error {err}"


def test_masked_grad_y_with_nothing_wanted_writes_nothing():
    """Asked for neither dxa nor dB (e.g. only the bias gradient), the piece returns empty
    tensors and leaves dY alone (a kernel launched with placeholder pointers wrote into it)."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(37, 44, generator=gen)
    before = g.clone()
    grad_xa, grad_B = triton_lora.masked_grad_y(g, torch.randn(44, 5, generator=gen), torch.randn(37, 5, generator=gen),
                                                0.7, seed_tensor(1), 0.3, False, False)
    assert grad_xa.numel() == 0 and grad_B.numel() == 0
    assert torch.equal(g, before)


@pytest.mark.parametrize("num_parts, n_rows, r, r_pad", [(1, 5, 3, 16), (2, 8, 16, 16), (5, 37, 11, 16),
                                                        (9, 20, 40, 64)])
@pytest.mark.parametrize("transpose_out", [False, True])
def test_sum_partials_adds_every_partial_in_loads_of_several(num_parts, n_rows, r, r_pad, transpose_out):
    """_sum_partials_kernel loads BLOCK_PARTS partials at once (2 here, the interpreter's blocks): odd
    counts leave a masked tail, rows a tail of row blocks; an output of r < r_pad columns gets the sums of
    the partials' first r, one of r_pad all of them, either way round (transpose_out)."""
    gen = torch.Generator().manual_seed(num_parts * 100 + n_rows)
    partials = torch.randn(num_parts, n_rows, r_pad, generator=gen)
    out = torch.full((r, n_rows) if transpose_out else (n_rows, r), float("nan"))
    out_wide = torch.full((r_pad, n_rows) if transpose_out else (n_rows, r_pad), float("nan"))
    triton_lora._sum_partials(partials, out, scale=0.5, transpose_out=transpose_out)
    expected = 0.5 * partials.double().sum(0)[:, :r]
    expected = expected.t() if transpose_out else expected
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    triton_lora._sum_partials(partials, out_wide, transpose_out=transpose_out)
    wide = partials.double().sum(0)
    torch.testing.assert_close(out_wide.double(), wide.t() if transpose_out else wide, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_parts, n_rows, r, r_pad", [(2, 1000, 64, 64), (1, 777, 16, 16), (2, 333, 8, 16),
                                                        (2, 300, 32, 32)])
def test_sum_partials_gpu_blocks_same_bits(monkeypatch, num_parts, n_rows, r, r_pad):
    """The GPU's block rule at 2 partials or fewer (both at once on rows for ~8 programs per SM, NOTES.md #85),
    run through the kernel here (the interpreter otherwise takes its own small blocks; a small SM count so that
    several programs run): the same bits as one partial per step and as (0 + p0 + p1) · scale in float32, NaN
    and -0.0 included."""
    sms = 4
    monkeypatch.setattr(triton_lora, "_INTERPRET", False)
    gpu_blocks = triton_lora._sum_blocks(num_parts, n_rows, r_pad, sms)
    monkeypatch.setattr(triton_lora, "_INTERPRET", True)
    assert gpu_blocks != triton_lora.one_partial_per_step_blocks(r_pad)
    gen = torch.Generator().manual_seed(n_rows)
    partials = torch.randn(num_parts, n_rows, r_pad, generator=gen)
    partials[0, 0, 0], partials[-1, 1, 0], partials[:, 2, 1] = float("nan"), -0.0, -0.0
    results = []
    for blocks in (gpu_blocks, triton_lora.one_partial_per_step_blocks(r_pad)):
        monkeypatch.setattr(triton_lora, "_sum_blocks", lambda *args, blocks=blocks: blocks)
        out = torch.empty(n_rows, r)
        triton_lora._sum_partials(partials, out, scale=0.5)
        results.append(out.view(torch.int32))  # bits: NaN and the sign of zero compared too
    expected = torch.zeros(n_rows, r_pad)
    for part in partials:
        expected = expected + part
    expected = (expected * 0.5)[:, :r].contiguous()
    assert torch.equal(results[0], results[1]), gpu_blocks
    assert torch.equal(results[0], expected.view(torch.int32)), gpu_blocks


# The fused forward GEMM (lora_ext/kernels/fused_forward.py; the native CUDA path runs it on
# Hopper for dropout-free k/v-sized layers). Small tiles so that the odd shapes below have row,
# column, K and rank tails, and runs of several column blocks (xa reused across a run's tiles).
TINY_TILES = dict(block_m=16, block_n=32, block_k=32, epilogue_chunks=2, num_stages=1, num_warps=4)


@pytest.mark.parametrize("M, K, N, r", [(37, 72, 56, 8), (130, 40, 104, 16), (9, 136, 24, 24), (33, 48, 96, 64)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("runs", [1, 2, None])
def test_fused_forward_matches_float64(M, K, N, r, p, runs):
    """y (LoRA term in the accumulator without dropout, masked in the epilogue with 'post' dropout)
    and xa against float64, with and without bias, within the CPU op's bound; every run of a row
    block stores the same xa. The scale makes the LoRA term the larger part of y, so that an error
    in it (1% is enough) cannot hide in the base GEMM's rounding."""
    from lora_ext.kernels import fused_forward

    scale = 3.0
    for bias in (True, False):
        inputs = make_inputs((M,), K, N, r, torch.float16, bias=bias, seed=M + N + r)
        x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
        assert fused_forward.layout_supported(x, w, b, A, B)
        seed = seed_tensor(99) if p > 0 else None
        y, xa = fused_forward.linear_forward(x, w, b, A, B, scale, p, seed, runs=runs, **TINY_TILES)
        y_cpu, xa_cpu = torch.ops.lora.linear(x, w, b, A, B, scale, p, "post", seed)
        ref = lora_linear_reference(x, w, b, A, B, scale, p, "post", seed, compute_dtype=torch.float64)
        assert y.dtype == xa.dtype == torch.float16
        assert_within_bound(y, ref, y_cpu, torch.float16, f"y (bias={bias})")
        assert_within_bound(xa, x.double() @ A.double().t(), xa_cpu, torch.float16, "xa")


def test_fused_forward_keeps_s_xa_out_of_float16():
    """float16, |xa| = 32000 (representable) and s = 4: s xa = 128000 is not, but the composed path
    applies s in float32 (addmm's alpha) and y is finite. The fused forward must agree, with and
    without 'post' dropout: the scale goes on B's tile, not on xa."""
    from lora_ext.kernels import fused_forward

    M, K, N, r, scale = 20, 32, 40, 8, 4.0
    x = torch.full((M, K), 100.0, dtype=torch.float16)
    A = torch.full((r, K), 10.0, dtype=torch.float16)  # xa = 32 * 100 * 10 = 32000
    B = torch.full((N, r), 1e-3, dtype=torch.float16)
    w = (torch.randn(N, K, generator=torch.Generator().manual_seed(3)) / K).to(torch.float16)
    for p in (0.0, 0.5):
        seed = seed_tensor(4) if p > 0 else None
        y, xa = fused_forward.linear_forward(x, w, None, A, B, scale, p, seed, **TINY_TILES)
        y_cpu, _ = torch.ops.lora.linear(x, w, None, A, B, scale, p, "post", seed)
        ref = lora_linear_reference(x, w, None, A, B, scale, p, "post", seed, compute_dtype=torch.float64)
        assert torch.equal(xa, torch.full((M, r), 32000.0, dtype=torch.float16))
        assert bool(torch.isfinite(y).all()), f"p={p}: s xa overflowed float16"
        assert_within_bound(y, ref, y_cpu, torch.float16, f"y (p={p})")


def test_fused_forward_post_dropout_keeps_a_dropped_inf_as_nan():
    """'post' dropout multiplies a dropped LoRA term by 0, as torch's dropout and every other path:
    an Inf in B gives NaN in the dropped elements of its column, never a finite value, and the
    kept ones are Inf, exactly as the float64 reference."""
    from lora_ext.kernels import fused_forward

    M, K, N, r, p, scale = 32, 32, 32, 8, 0.5, 0.75
    inputs = make_inputs((M,), K, N, r, torch.float16, bias=False, seed=7)
    x, w, A, B = (inputs[k].detach() for k in ("x", "weight", "lora_A", "lora_B"))
    B = B.clone()
    B[5, 0] = float("inf")
    seed = seed_tensor(7)
    y, _ = fused_forward.linear_forward(x, w, None, A, B, scale, p, seed, **TINY_TILES)
    ref = lora_linear_reference(x, w, None, A, B, scale, p, "post", seed, compute_dtype=torch.float64)
    dropped = ~dropout_keep_mask(7, M, N, p)[:, 5]
    assert 0 < int(dropped.sum()) < M
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert bool(torch.isnan(y[dropped, 5]).all())


@pytest.mark.parametrize("r", [8, 16, 24])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_forward_keeps_an_inf_in_x_as_inf(r, p):
    """An Inf in x with positive W, A and B: y's row is +Inf (kept elements) as the float64 reference,
    never NaN, for ranks padded to 16 (8: xa's round trip through a scratch of padded rows, NOTES.md
    #61; 24: to 32) and not (16). The padding ranks' sums (x times A's zero rows: Inf * 0 = NaN) must
    not reach y through B's zero padding; with 'post' dropout a dropped element is the LoRA term times
    0, NaN there as in the reference."""
    from lora_ext.kernels import fused_forward

    M, K, N, scale = 20, 32, 40, 0.5
    gen = torch.Generator().manual_seed(r)
    x, w, A, B = ((torch.rand(*shape, generator=gen) + 0.1).to(torch.float16)
                  for shape in ((M, K), (N, K), (r, K), (N, r)))
    x[3, 5] = float("inf")
    seed = seed_tensor(5) if p > 0 else None
    y, xa = fused_forward.linear_forward(x, w, None, A, B, scale, p, seed, **TINY_TILES)
    ref = lora_linear_reference(x, w, None, A, B, scale, p, "post", seed, compute_dtype=torch.float64)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert bool(torch.isinf(y[3]).any()) and bool(torch.isfinite(y[torch.arange(M) != 3]).all())
    assert torch.equal(torch.isinf(xa), torch.isinf(x.double() @ A.double().t()))


# (M, K, N, r) for the few-row tiles the forward picks itself (small_m_config; 4 programs on CPU
# tensors): one row, a partial 16-row block, K past a 256-wide step and short of one, 16- to
# 128-wide column blocks with a tail (N = 520: 128-wide), the ranks padded to 16, 32 and 64, and
# 33 rows (a 64-row block).
SMALL_M_CASES = [(1, 264, 56, 8), (5, 72, 520, 16), (16, 528, 104, 24), (3, 40, 24, 64), (33, 136, 40, 8)]


@pytest.mark.parametrize("M, K, N, r", SMALL_M_CASES)
def test_fused_forward_small_m_tiles_match_float64(monkeypatch, M, K, N, r):
    """Up to 64 rows linear_forward takes small_m_config's tiles (the native path's fused forward for
    few tokens, on by default): y and xa against float64 with and without bias, within the CPU op's
    bound; the launch's tiles are the rule's."""
    from lora_ext.kernels import fused_forward, replay

    tiles = []
    launch = replay.launch

    def recording_launch(kernel, grid, *args, **meta):
        tiles.append({k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "num_warps")})
        return launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(replay, "launch", recording_launch)
    config = fused_forward.small_m_config(M, N, r, 4)
    expected = {"BLOCK_M": config["block_m"], "BLOCK_N": config["block_n"], "BLOCK_K": config["block_k"],
                "num_stages": config["num_stages"], "num_warps": 4}
    scale = 3.0
    for bias in (True, False):
        inputs = make_inputs((M,), K, N, r, torch.float16, bias=bias, seed=M + N + r)
        x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
        y, xa = fused_forward.linear_forward(x, w, b, A, B, scale)
        y_cpu, xa_cpu = torch.ops.lora.linear(x, w, b, A, B, scale)
        ref = lora_linear_reference(x, w, b, A, B, scale, compute_dtype=torch.float64)
        assert_within_bound(y, ref, y_cpu, torch.float16, f"y (bias={bias})")
        assert_within_bound(xa, x.double() @ A.double().t(), xa_cpu, torch.float16, "xa")
    assert tiles == [expected, expected]


@pytest.mark.parametrize("M, K, N, r", [(37, 72, 56, 8), (130, 40, 104, 16), (9, 136, 24, 24), (33, 48, 96, 64)])
@pytest.mark.parametrize("runs", [1, 2, None])
def test_fused_grad_input_matches_float64(M, K, N, r, runs):
    """The input gradient as one GEMM of the same kernel (transposed operands): dx = g W + (s g B) A
    and s g B against float64, within the CPU op's bound (its dx from autograd through the op).
    The scale makes the LoRA term the larger part of dx, as in the forward cases."""
    from lora_ext.kernels import fused_forward

    scale = 3.0
    inputs = make_inputs((M,), K, N, r, torch.float16, bias=False, seed=M + N + r + 1)
    x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(M), dtype=torch.float64).to(torch.float16)
    x, w, A, B = x.detach().requires_grad_(), w.detach(), A.detach(), B.detach()
    assert fused_forward.grad_input_layout_supported(g, w, A, B)
    grad_x, g_b = fused_forward.grad_input(g, w, A, B, scale, runs=runs, **TINY_TILES)
    y_cpu, _ = torch.ops.lora.linear(x, w, None, A, B, scale, 0.0, "post", None)
    (grad_x_cpu,) = torch.autograd.grad(y_cpu, [x], g)
    g_b_ref = g.double() @ B.double()
    grad_x_ref = g.double() @ w.double() + scale * g_b_ref @ A.double()
    assert grad_x.dtype == g_b.dtype == torch.float16
    assert_within_bound(grad_x, grad_x_ref, grad_x_cpu, torch.float16, "dx")
    assert_within_bound(g_b, scale * g_b_ref, scale * (g @ B), torch.float16, "s g B")


def test_fused_grad_input_rounds_s_g_B_once_as_the_composed_path():
    """float16 with s < 1 where g B itself passes float16's 65504 but s g B does not: the fused input
    gradient rounds s g B once (as the composed path's scaled GEMM), so grad_xa and dx stay finite
    (rounded before scaling, g B would be inf and so would dx and dA)."""
    from lora_ext.kernels import fused_forward

    M, K, N, r, scale = 20, 40, 48, 8, 0.25
    gen = torch.Generator().manual_seed(5)
    g = torch.full((M, N), 64.0, dtype=torch.float16)
    B = torch.full((N, r), 32.0, dtype=torch.float16)  # g B = 48 * 64 * 32 = 98304 > 65504; s g B = 24576
    w = (torch.randn(N, K, generator=gen) / N).to(torch.float16)
    A = (torch.randn(r, K, generator=gen) / (8 * K)).to(torch.float16)
    grad_x, grad_xa = fused_forward.grad_input(g, w, A, B, scale, **TINY_TILES)
    assert bool(torch.isfinite(grad_xa).all()) and bool(torch.isfinite(grad_x).all())
    assert torch.equal(grad_xa, torch.full((M, r), 24576.0, dtype=torch.float16))
    grad_x_ref = g.double() @ w.double() + scale * (g.double() @ B.double()) @ A.double()
    assert_within_bound(grad_x, grad_x_ref, g @ w + (scale * (g.float() @ B.float())).half() @ A, torch.float16, "dx")


@pytest.mark.parametrize("M, K, N, r", [(37, 72, 56, 8), (130, 40, 104, 16), (9, 136, 24, 24), (33, 48, 96, 64)])
@pytest.mark.parametrize("runs", [1, 2, None])
def test_fused_grad_input_given_xa_matches_float64(M, K, N, r, runs):
    """The input gradient with 'post' dropout: dx = g W + grad_xa A with grad_xa (M, r) given (a
    column slice of a wider tensor: its own row stride), against float64 within the bound of the
    same products in float16; grad_xa is large so that the LoRA term dominates dx, and the kernel
    must not write into it."""
    from lora_ext.kernels import fused_forward

    gen = torch.Generator().manual_seed(M + r)
    inputs = make_inputs((M,), K, N, r, torch.float16, bias=False, seed=M + N + r + 2)
    w, A, B = (inputs[k].detach() for k in ("weight", "lora_A", "lora_B"))
    g = torch.randn(M, N, generator=gen, dtype=torch.float64).to(torch.float16)
    grad_xa = (3.0 * torch.randn(M, r + 8, generator=gen, dtype=torch.float64)).to(torch.float16)[:, 8:]
    before = grad_xa.clone()
    assert fused_forward.grad_input_given_xa_layout_supported(g, w, A, B, grad_xa)
    grad_x = fused_forward.grad_input_given_xa(g, w, A, B, grad_xa, runs=runs, **TINY_TILES)
    ref = g.double() @ w.double() + grad_xa.double() @ A.double()
    assert grad_x.dtype == torch.float16 and grad_x.shape == (M, K)
    assert_within_bound(grad_x, ref, (g.float() @ w.float() + grad_xa.float() @ A.float()).half(), torch.float16, "dx")
    assert torch.equal(grad_xa, before)


def test_fused_grad_input_given_xa_layout_checks():
    from lora_ext.kernels import fused_forward

    g = torch.randn(64, 48, dtype=torch.float16)
    w, A, B = (torch.randn(*shape, dtype=torch.float16) for shape in ((48, 64), (8, 64), (48, 8)))
    grad_xa = torch.randn(64, 8, dtype=torch.float16)
    ok = fused_forward.grad_input_given_xa_layout_supported
    assert ok(g, w, A, B, grad_xa) and not fused_forward.grad_input_given_xa_supports(g, w, A, B, grad_xa)
    assert not ok(g, w, A, B, grad_xa.float())  # another dtype than the adapters'
    assert not ok(g, w, A, B, grad_xa[:63])  # not one row per token
    assert not ok(g, w, A, B, torch.randn(64, 16, dtype=torch.float16)[:, ::2])  # ranks not contiguous
    assert not ok(g, None, A, B, grad_xa)  # no base weight


def test_fused_grad_input_layout_checks():
    from lora_ext.kernels import fused_forward

    g = torch.randn(64, 48, dtype=torch.float16)
    w, A, B = (torch.randn(*shape, dtype=torch.float16) for shape in ((48, 64), (8, 64), (48, 8)))
    ok = fused_forward.grad_input_layout_supported
    assert ok(g, w, A, B) and not fused_forward.grad_input_supports(g, w, A, B)  # CPU: never on the GPU path
    assert not ok(g, None, A, B)  # no base weight
    assert not ok(g[:, :40], w, A, B)  # g's columns are not W's rows
    assert not ok(g.float(), w.float(), A.float(), B.float())  # float32
    assert not ok(g, w[:, :60], A[:, :60], B)  # dx rows of 60 halves: not 16-byte aligned
    assert not ok(g[:, 1:], w[1:], A, B[1:])  # base pointers off by 2 bytes
    assert not ok(g[:0], w, A, B)  # no tokens


def test_fused_forward_layout_checks():
    """What TMA cannot address or the kernel does not compute is refused (the op then composes)."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs((64,), 64, 48, 8, torch.float16, seed=5)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    ok = fused_forward.layout_supported
    assert ok(x, w, b, A, B) and ok(x, w, None, A, B)
    assert not fused_forward.supports(x, w, b, A, B)  # CPU tensors: the GPU path never takes them
    assert not ok(x, None, b, A, B)  # no base weight
    assert not ok(x.float(), w.float(), b.float(), A.float(), B.float())  # float32
    assert not ok(x, w, b, A.double(), B.double())  # adapters in another dtype
    a5, b5 = A[:5].contiguous(), B[:, :5].contiguous()
    assert not ok(x, w, b, a5, b5)  # r = 5: B's rows are 10 bytes, not 16-byte aligned
    x_odd = torch.randn(64, 60, dtype=torch.float16)
    assert not ok(x_odd, w[:, :60].contiguous(), b, A[:, :60].contiguous(), B)  # K = 60
    assert not ok(x[:, 1:], w[:, 1:], b, A[:, 1:], B)  # base pointers off by 2 bytes
    assert not ok(x.t().contiguous().t(), w, b, A, B)  # column-major x
    assert not ok(x, w, b, torch.randn(72, 64, dtype=torch.float16), torch.randn(48, 72, dtype=torch.float16))
    assert not ok(x[:0], w, b, A, B)  # no tokens
    assert not ok(x[:1].expand(64, 64), w, b, A, B)  # expanded x: row stride 0


def test_triton_backend_composes_where_the_fused_forward_does_not_fit(monkeypatch):
    """On a GPU with less shared memory than Hopper's 227 KiB the fused GEMM's launch fails
    (OutOfResources, when the compiled kernel is loaded): the Triton backend's forward must then
    compute y and xa with its other kernels (against float64), and that variant is refused
    afterwards without another load; a variant that differs (another rank padding) still tries."""
    from triton.runtime.errors import OutOfResources

    from lora_ext.kernels import fused_forward

    attempts = []
    real_launch = fused_forward.replay.launch

    def launch(kernel, grid, *args, **meta):
        if kernel is fused_forward._lora_gemm_kernel:
            attempts.append(meta["R_PAD"])
            raise OutOfResources(262208, 101376, "shared memory")
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(fused_forward.replay, "launch", launch)
    monkeypatch.setattr(fused_forward, "_DOES_NOT_FIT", {})
    monkeypatch.setattr(fused_forward, "supports", lambda *tensors: True)  # as on a CUDA sm_90+ device
    monkeypatch.setattr(triton_lora, "FUSED_FORWARD_MIN_ROWS", 1)
    for r, tries in ((8, [16]), (8, [16]), (24, [16, 32])):
        inputs = make_inputs((40,), 48, 56, r, torch.float16, seed=r)
        x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
        y, xa = triton_lora.linear_forward(x, w, b, A, B, SCALE)
        y_cpu, xa_cpu = torch.ops.lora.linear(x, w, b, A, B, SCALE)
        assert_within_bound(y, lora_linear_reference(x, w, b, A, B, SCALE, compute_dtype=torch.float64), y_cpu,
                            torch.float16, f"y (r={r})")
        assert_within_bound(xa, x.double() @ A.double().t(), xa_cpu, torch.float16, f"xa (r={r})")
        assert attempts == tries
    assert fused_forward.unless_out_of_resources(
        lambda: fused_forward.linear_forward(x, w, b, A, B, SCALE)) is None
    assert attempts == [16, 32] and len(fused_forward._DOES_NOT_FIT) == 2


@pytest.mark.parametrize("switch", [True, False], ids=["fused_post_dropout_on", "off"])
def test_triton_backend_post_forward_is_the_fused_kernel_when_switched_on(monkeypatch, switch):
    """'post' dropout on the Triton backend: with lora_ext._C.set_fused_post_dropout(True) (the default)
    the forward is the fused GEMM with the mask in its epilogue (at sizes the native rule takes:
    here FUSED_FORWARD_MIN_ROWS lowered, the device check passed, as on an sm_90 GPU), else its thin
    kernels; y within the float64 bound either way (the same mask), xa = x A^T."""
    from lora_ext.kernels import fused_forward

    launched = []
    real_launch = fused_forward.replay.launch

    def launch(kernel, grid, *args, **meta):
        if kernel is fused_forward._lora_gemm_kernel:
            launched.append(meta["POST_DROPOUT"])
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(fused_forward.replay, "launch", launch)
    monkeypatch.setattr(fused_forward, "supports", lambda *tensors: True)  # as on a CUDA sm_90+ device
    monkeypatch.setattr(triton_lora, "FUSED_FORWARD_MIN_ROWS", 1)
    previous = lora_ext._C.set_fused_post_dropout(switch)
    try:
        inputs = make_inputs((40,), 48, 56, 8, torch.float16, seed=8)
        x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
        seed, p = seed_tensor(5), 0.3
        y, xa = triton_lora.linear_forward(x, w, b, A, B, SCALE, p, "post", seed)
        y_cpu, _ = torch.ops.lora.linear(x, w, b, A, B, SCALE, p, "post", seed)
        ref = lora_linear_reference(x, w, b, A, B, SCALE, p, "post", seed, compute_dtype=torch.float64)
        assert_within_bound(y, ref, y_cpu, torch.float16, "y")
        assert_within_bound(xa, x.double() @ A.double().t(), x @ A.t(), torch.float16, "xa")
        assert launched == ([True] if switch else [])
        # 'pre' dropout never takes it
        triton_lora.linear_forward(x, w, b, A, B, SCALE, p, "pre", seed)
        assert launched == ([True] if switch else [])
    finally:
        lora_ext._C.set_fused_post_dropout(previous)


@pytest.mark.parametrize("M, K, N, r", [(37, 72, 56, 8), (130, 40, 104, 16), (9, 136, 24, 24), (33, 48, 96, 64),
                                        (70, 3, 17, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "rank_strided", "rank_strided_odd"])
def test_adapter_grads_match_float64(M, K, N, r, layout):
    """Both adapter gradients of the dropout-free backward in one launch (adapter_grads.py):
    dA = s_A grad_xa^T x and dB = s_B g^T xa against float64, within the bound of the same
    products in float16; row counts that are not multiples of the tile, K and N that are not
    multiples of the column block, r padded to the MMA's 16, x and g as strided views (the
    kernel reads any strides), grad_xa and xa as column slices of wider tensors (row strides r + 8 and
    r + 3: the kernel's 16-byte rank hint, rank_hint.rank_alignment, taken at r = 8, 16 and 24 with
    the first and not with the second; the columns past r are never read). Twice gives the same bits
    (each output has one summation order), and dA alone (grad_A_only) and dB alone (grad_B_only) the same bits as together."""
    from lora_ext.kernels import adapter_grads

    gen = torch.Generator().manual_seed(M + K + r)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(torch.float16)

    grad_xa, xa = randn(M, r), randn(M, r)
    if layout.startswith("rank_strided"):
        # the columns past r hold NaN: read, they would reach dA and dB
        extra = 8 if layout == "rank_strided" else 3
        wide = [torch.full((M, r + extra), float("nan"), dtype=torch.float16) for _ in range(2)]
        for full, small in zip(wide, (grad_xa, xa)):
            full[:, :r] = small
        grad_xa, xa = (full[:, :r] for full in wide)
    if layout == "strided":
        x, g = randn(K, M).t(), randn(M, 2 * N)[:, ::2]  # column-major x, every other column of g
    else:
        x, g = randn(M, K), randn(M, N)
    assert adapter_grads.supported(grad_xa, x, xa, g)
    grad_A, grad_B = adapter_grads.adapter_grads(grad_xa, x, xa, g, 0.5, 3.0, block_m=32, block_c=16)
    assert grad_A.dtype == grad_B.dtype == torch.float16
    assert_within_bound(grad_A, 0.5 * grad_xa.double().t() @ x.double(), 0.5 * (grad_xa.t() @ x), torch.float16, "dA")
    assert_within_bound(grad_B, 3.0 * g.double().t() @ xa.double(), 3.0 * (g.t() @ xa), torch.float16, "dB")
    again = adapter_grads.adapter_grads(grad_xa, x, xa, g, 0.5, 3.0, block_m=32, block_c=16)
    assert torch.equal(again[0], grad_A) and torch.equal(again[1], grad_B)
    # dA alone (the 'post' dropout backward) and dB alone (the two launches of the memory budget): the
    # same programs, so the same bits
    assert torch.equal(adapter_grads.grad_A_only(grad_xa, x, 0.5, block_m=32, block_c=16), grad_A)
    assert torch.equal(adapter_grads.grad_B_only(xa, g, 3.0, block_m=32, block_c=16), grad_B)


def test_adapter_grads_address_column_major_operands_past_2_31_elements():
    """A column-major x whose last column starts past element 2^31 (a transposed view of a large
    tensor): the kernel's column offsets are 64-bit, so every column block of dA is right (in int32
    they wrapped to a negative offset: a crash or another allocation's data). The storage is
    allocated, not touched: only the pages of the 32 x 160 elements read are resident."""
    from lora_ext.kernels import adapter_grads

    M, K, r, column_stride = 32, 160, 8, 2**24  # column 128's first element is element 2^31
    gen = torch.Generator().manual_seed(11)
    storage = torch.empty((K - 1) * column_stride + M, dtype=torch.float16)  # ~5.3 GB of address space
    x = storage.as_strided((M, K), (1, column_stride))
    x.copy_(torch.randn(M, K, generator=gen).to(torch.float16))
    grad_xa, xa = (torch.randn(M, r, generator=gen).to(torch.float16) for _ in range(2))
    g = torch.randn(M, 24, generator=gen).to(torch.float16)
    assert adapter_grads.supported(grad_xa, x, xa, g)
    grad_A, grad_B = adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, 1.0, block_m=32, block_c=16)
    assert_within_bound(grad_A, grad_xa.double().t() @ x.double(), grad_xa.t() @ x, torch.float16, "dA")
    assert_within_bound(grad_B, g.double().t() @ xa.double(), g.t() @ xa, torch.float16, "dB")


@pytest.mark.parametrize("strided", ["lora_A", "lora_B", "xa"])
def test_thin_kernels_address_rank_strides_past_2_31_elements(strided):
    """Operands whose rank index has a large stride (views of big tensors): lora_A a row slice of an
    (r, 2^24) tensor, lora_B or xa column-major with column stride 2^24; at r = 129 the last rank
    starts at element 2^31. The kernels' rank offsets are 64-bit, so y and every gradient match
    float64 (in int32 they wrapped: a crash). The storage is allocated, only touched pages resident."""
    M, K, N, r, big, scale = 32, 40, 48, 129, 2**24, 0.5
    gen = torch.Generator().manual_seed(13)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) / 8).to(torch.float16)

    def spread(t, strides):  # t's values in a view with these strides over a large lazy storage
        extent = sum((n - 1) * st for n, st in zip(t.shape, strides)) + 1
        return torch.empty(extent, dtype=t.dtype).as_strided(t.shape, strides).copy_(t)

    x, A, B, gy = randn(M, K), randn(r, K), randn(N, r), randn(M, N)
    if strided == "lora_A":
        A = spread(A, (big, 1))
    elif strided == "lora_B":
        B = spread(B, (1, big))
    y, xa = triton_lora.linear_forward(x, None, None, A, B, scale)
    xd, Ad, Bd, gd = x.double(), A.double(), B.double(), gy.double()
    xa_ref = xd @ Ad.t()
    assert_within_bound(xa, xa_ref, x @ A.t(), torch.float16, "xa")
    assert_within_bound(y, scale * xa_ref @ Bd.t(), scale * ((x @ A.t()) @ B.t()), torch.float16, "y")
    if strided == "xa":
        xa = spread(xa, (1, big))
    grad_x, _, _, grad_A, grad_B = triton_lora.linear_backward(gy, x, None, A, B, xa, scale, 0.0, "post", None,
                                                               [True, False, False, True, True])
    grad_xa_ref = scale * gd @ Bd
    assert_within_bound(grad_x, grad_xa_ref @ Ad, (scale * (gy @ B)) @ A, torch.float16, "dx")
    assert_within_bound(grad_A, grad_xa_ref.t() @ xd, (scale * (gy @ B)).t() @ x, torch.float16, "dA")
    assert_within_bound(grad_B, scale * gd.t() @ xa.double(), scale * (gy.t() @ xa), torch.float16, "dB")


# Extra columns (NaN) past r of B's rows and of xa's / dxa's rows: 8 keeps the rows 16-byte aligned at r = 8
# and 24 (the hint is taken), 3 does not (that operand's hint is 1). Each operand apart, so that a launcher that
# left one of them out of its hint would read wrong rows in one of these layouts.
RANK_STRIDED_LAYOUTS = {"rank_strided": (8, 8), "rank_strided_odd": (3, 3), "B_odd": (3, 8), "rows_odd": (8, 3)}


@pytest.mark.parametrize("r", [8, 24])
@pytest.mark.parametrize("layout", list(RANK_STRIDED_LAYOUTS))
@pytest.mark.parametrize("p, position", [(0.0, "post"), (0.3, "pre"), (0.3, "post")])
def test_thin_kernels_read_rank_strided_operands(monkeypatch, r, layout, p, position):
    """The Triton backend's thin kernels and the native path's masked pieces at r = 8 and 24, where they take
    the 16-byte rank hints (RANK_ALIGN and PANEL_ALIGN, rank_hint.rank_alignment; NOTES.md #63, #66): lora_B,
    xa and dxa as column slices of wider tensors whose columns past r hold NaN (RANK_STRIDED_LAYOUTS) give the
    same bits as contiguous ones; a padding column read would put NaN in the outputs, a row read at a wrong
    stride other numbers. The masked pieces run both ways: dxa with dB (the one pass over dY,
    _lora_down_reduce_kernel) and without (_lora_down_kernel, B the panel). Contiguous, the outputs are within
    the float64 bound (run_case), and the contiguous launches took the hint (rank_alignment answered 8 every
    time). Under the interpreter the arithmetic is the same with or without the hint, so the bits of a
    launch without it (rank_alignment patched to 1) equal these by construction: that comparison only shows
    that the patch reaches every launch; the GPU's compiled variants are tested on the GPU (test_cuda.py)."""
    M, K, N = 37, 40, 44
    inputs = make_inputs((M,), K, N, r, torch.float16, seed=r)
    run_case(inputs, p, position, seed_value=77)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    seed = seed_tensor(77) if p > 0 else None
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(torch.float16)
    extra_B, extra_rows = RANK_STRIDED_LAYOUTS[layout]

    def rank_strided(t, extra):
        wide = torch.full((t.shape[0], r + extra), float("nan"), dtype=t.dtype)
        wide[:, :r] = t
        return wide[:, :r]

    def outputs(strided):
        """y, xa and the five gradients (the backward given xa, or its rank-strided copy), then with dropout
        the masked pieces: (dxa, dB) and dxa alone over dY given B and xa, (dx, dA) over x given dxa (or their
        copies)."""
        B_in = rank_strided(B, extra_B) if strided else B
        y, xa = triton_lora.linear_forward(x, w, b, A, B_in, SCALE, p, position, seed)
        xa_in = rank_strided(xa, extra_rows) if strided else xa
        grads = triton_lora.linear_backward(grad_y, x, w, A, B_in, xa_in, SCALE, p, position, seed, [True] * 5)
        pieces = ()
        if p > 0:
            grad_xa, grad_B = triton_lora.masked_grad_y(grad_y, B_in, xa_in, SCALE, seed, p, True, True)
            grad_xa_alone, _ = triton_lora.masked_grad_y(grad_y, B_in, xa_in, SCALE, seed, p, True, False)
            grad_x, grad_A = triton_lora.masked_up(rank_strided(grad_xa, extra_rows) if strided else grad_xa, A,
                                                  x, seed, p, True, True)
            pieces = (grad_xa, grad_B, grad_xa_alone, grad_x, grad_A)
        return (y, xa, *grads, *pieces)

    contiguous = outputs(strided=False)
    strided = outputs(strided=True)
    assert all(not t.isnan().any() for t in strided)
    assert all(torch.equal(a, c) for a, c in zip(strided, contiguous))
    hints = []
    rank_alignment = triton_lora.rank_alignment
    monkeypatch.setattr(triton_lora, "rank_alignment", lambda *a: hints.append(rank_alignment(*a)) or 1)
    assert all(torch.equal(a, c) for a, c in zip(outputs(strided=False), contiguous))
    assert hints and set(hints) == {8}  # the contiguous operands took the hint


def test_adapter_grads_refuse_what_they_do_not_compute():
    from lora_ext.kernels import adapter_grads

    grad_xa, xa = torch.randn(64, 8, dtype=torch.float16), torch.randn(64, 8, dtype=torch.float16)
    x, g = torch.randn(64, 48, dtype=torch.float16), torch.randn(64, 40, dtype=torch.float16)
    ok = adapter_grads.supported
    assert ok(grad_xa, x, xa, g)
    assert not ok(grad_xa.float(), x.float(), xa.float(), g.float())  # float32
    assert not ok(grad_xa, x.double(), xa, g)  # mixed dtypes
    assert not ok(grad_xa, x[:63], xa, g)  # x's rows are not the tokens of xa
    assert not ok(grad_xa[:, :4], x, xa, g)  # grad_xa's rank is not xa's
    assert not ok(grad_xa.t().contiguous().t(), x, xa, g)  # column-major (M, r): rows of r are not contiguous
    assert not ok(torch.randn(64, 72, dtype=torch.float16), x, torch.randn(64, 72, dtype=torch.float16), g)  # r > 64
    assert not ok(grad_xa[:0], x[:0], xa[:0], g[:0])  # no tokens
    # The op's callbacks take only Hopper or newer, where the one launch was measured (NOTES.md #39):
    # tensors the kernel computes (under the interpreter here) go back to cuBLAS off such a GPU.
    from lora_ext.kernels import cuda_dispatch

    assert cuda_dispatch.adapter_grads_callback(grad_xa, x, xa, g, 1.0, 1.0) is None
    assert cuda_dispatch.grad_A_only_callback(grad_xa, x, 1.0) is None
    assert cuda_dispatch.grad_B_only_callback(xa, g, 1.0) is None


@pytest.mark.parametrize("M, K, N, r, chunks", [(37, 72, 56, 8, 2), (130, 40, 104, 16, 4), (33, 136, 24, 24, 1)])
@pytest.mark.parametrize("programs", [1, 3, 8])
def test_dx_grad_a_probe_kernel_matches_float64(M, K, N, r, chunks, programs):
    """benchmarks/dx_grad_a_probe.py's kernel (NOTES.md #64: dx = g W + grad_xa A on column runs, dA =
    grad_xaᵀ x from x's tiles in its epilogue, float32 partials per run), and its flattened variant (#65),
    against float64 at odd sizes and run splits: the probe's GPU timings rest on it computing this."""
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import dx_grad_a_probe as probe

    gen = torch.Generator().manual_seed(M + r)
    g = torch.randn(M, N, generator=gen).half()
    W = (torch.randn(N, K, generator=gen) * N**-0.5).half()
    A = (torch.randn(r, K, generator=gen) * K**-0.5).half()
    x, grad_xa = torch.randn(M, K, generator=gen).half(), torch.randn(M, r, generator=gen).half()
    tiles = dict(block_m=16, block_n=32, block_k=32, epilogue_chunks=chunks, num_stages=1, num_warps=4)
    dx_ref = g.double() @ W.double() + grad_xa.double() @ A.double()
    dA_ref = grad_xa.double().t() @ x.double()
    dx, dA = probe.dx_and_grad_a(g, W, A, x, grad_xa, programs=programs, **tiles)
    dx_flat, none = probe.dx_and_grad_a(g, W, A, x, grad_xa, with_da=False, flatten=True, programs=programs, **tiles)
    assert none is None
    for got, ref, what in ((dx, dx_ref, "dx"), (dA, dA_ref, "dA"), (dx_flat, dx_ref, "dx flattened")):
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 5e-3, f"{what}: relative error {err:.1e}"
