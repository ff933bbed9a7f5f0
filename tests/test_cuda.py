"""GPU tests of torch.ops.lora.* (marked `cuda`; skipped without a CUDA device).

Run on the H200 by scripts/h200_run.sh (`pytest tests -m cuda`). Every numerical check
compares with the float64 reference (lora_ext.reference), with a bound scaled by the
error of the same formula evaluated by torch in the same (least precise) dtype:

    max |ours - ref| <= 2 * max |torch_same_dtype - ref| + EPS[dtype] * max |ref|

Backends: "triton" always (when triton imports); "native" too when the extension was
built with CUDA (lora_ext._C.has_cuda()).

Note on run time: every distinct kernel variant (dtypes, dropout on/off, tile sizes)
is compiled by triton on first use, a few seconds each (the dropout variants longest):
the matrices below are arranged so that about 80 variants serve all tests.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import lora_ext
from lora_ext.reference import dropout_keep_mask, dropout_threshold, lora_linear_reference, philox_mask_bits

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
PRECISION_ORDER = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Slack of the bound relative to max |reference|, by the least precise dtype involved.
EPS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _backends():
    backends = []
    try:
        import triton  # noqa: F401

        backends.append("triton")
    except ImportError:
        pass
    if lora_ext._C.has_cuda():
        backends.append("native")
    return backends


BACKENDS = _backends()


def least_precise(*dtypes):
    return max(dtypes, key=PRECISION_ORDER.index)


def seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@contextlib.contextmanager
def switched(set_setting, value):
    """A native-path setting (lora_ext._C.set_*, which returns the previous one) at `value` inside
    the block, then back as it was; yields the previous setting."""
    previous = set_setting(value)
    try:
        yield previous
    finally:
        set_setting(previous)


def make_inputs(lead_shape, K, N, r, dtype, lora_dtype=None, bias=True, weight=True, requires_grad=True, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lora_dtype = lora_dtype or dtype

    def randn(*shape, dt, std=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device=DEVICE, dtype=dt)
        return t.requires_grad_(requires_grad)

    return dict(
        x=randn(*lead_shape, K, dt=dtype),
        weight=randn(N, K, dt=dtype, std=K**-0.5) if weight else None,
        bias=randn(N, dt=dtype) if bias else None,
        lora_A=randn(r, K, dt=lora_dtype, std=K**-0.5),
        lora_B=randn(N, r, dt=lora_dtype, std=r**-0.5),
    )


def present(inputs):
    return {k: v for k, v in inputs.items() if v is not None}


def max_abs_diff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_relative_error(actual, expected, what, rel, floor=0.0):
    """max |actual - expected| <= rel * max(max |expected|, floor), expected in float64 on any device."""
    err = max_abs_diff(actual.to(expected.device), expected)
    bound = rel * max(expected.abs().max().item(), floor)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"


def assert_within_bound(actual, reference, same_dtype, dtype, what):
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    if reference.numel() == 0:
        return
    err = max_abs_diff(actual, reference)
    base = max_abs_diff(same_dtype, reference)
    slack = EPS[dtype] * max(reference.detach().abs().max().item(), 1e-3)
    assert err <= 2 * base + slack, f"{what}: error {err:.3g} > 2 * {base:.3g} (torch, same dtype) + {slack:.3g}"


def run_and_check(inputs, scale, p, position, seed_value, backend):
    """y and every gradient through the op (autograd), vs the float64 reference."""
    seed = seed_tensor(seed_value) if p > 0 else None
    leaves = present(inputs)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    dtype = least_precise(x.dtype, A.dtype)

    y, xa = torch.ops.lora.linear(x, w, b, A, B, scale, p, position, seed, backend)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], B.shape[0])
    assert xa.dtype == A.dtype and xa.shape == (math.prod(x.shape[:-1]), A.shape[0])
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)

    def evaluate(compute_dtype):
        copies = {k: v.detach().to(compute_dtype).requires_grad_() for k, v in leaves.items()}
        out = lora_linear_reference(copies["x"], copies.get("weight"), copies.get("bias"), copies["lora_A"],
                                    copies["lora_B"], scale, p, position, seed, compute_dtype=compute_dtype)
        return out, torch.autograd.grad(out, list(copies.values()), grad_y.to(compute_dtype))

    y_ref, grads_ref = evaluate(torch.float64)
    y_same, grads_same = evaluate(dtype)
    tag = f"[{backend} x{tuple(x.shape)} {x.dtype} lora {A.dtype} p={p} {position}]"
    assert_within_bound(y, y_ref, y_same, dtype, f"{tag} y")
    for name, g, g_ref, g_same in zip(leaves, grads, grads_ref, grads_same):
        assert g.dtype == leaves[name].dtype, f"{tag} grad {name}: dtype {g.dtype}"
        assert_within_bound(g, g_ref, g_same, dtype, f"{tag} grad {name}")
    return y, xa, grads


# ---------------------------------------------------------------------------
# opcheck (the samples of test_ops.py, on cuda)
# ---------------------------------------------------------------------------


def _samples(requires_grad, dtype):
    from test_ops import sample_inputs  # tests/ is on sys.path under pytest

    return list(sample_inputs(DEVICE, requires_grad=requires_grad, dtype=dtype))


def _with_backend(args, backend):
    return (*args[:-1], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_linear(backend, requires_grad):
    torch.manual_seed(0)
    for sample in _samples(requires_grad, torch.float32):
        torch.library.opcheck(torch.ops.lora.linear.default, _with_backend(sample.op_args(), backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_linear_backward(backend):
    from test_ops import backward_args

    torch.manual_seed(1)
    masks = [(True,) * 5, (False, False, False, True, True), (True, False, False, True, True),
             (False, True, True, False, False), (False,) * 5]
    for i, sample in enumerate(_samples(False, torch.float32)):
        mask = masks[i % len(masks)]
        if sample.weight is None:
            mask = (mask[0], False) + mask[2:]
        args = _with_backend(backward_args(sample, mask), backend)
        torch.library.opcheck(torch.ops.lora.linear_backward.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_match_reference(backend):
    """Odd shapes and layouts (transposed, sliced, expanded, zero tokens, strided params) of test_ops.py."""
    from test_ops import assert_sample_matches_reference

    torch.manual_seed(2)
    for dtype in (torch.float32,):  # bfloat16 and float16: the matrix below (contiguous layouts)
        for sample in _samples(True, dtype):
            y, _ = torch.ops.lora.linear(*_with_backend(sample.op_args(), backend))
            assert_sample_matches_reference(sample, y, f"{backend} {sample}")


# ---------------------------------------------------------------------------
# Numerics: every dtype combination, input rank, bias and dropout
# ---------------------------------------------------------------------------

DTYPE_COMBOS = [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
]
DROPOUTS = [(0.0, "post"), (0.25, "pre"), (0.25, "post")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,position", DROPOUTS, ids=["no_dropout", "pre", "post"])
@pytest.mark.parametrize("dtype,lora_dtype", DTYPE_COMBOS, ids=lambda d: str(d).replace("torch.", ""))
def test_numerics_every_dtype_rank_bias_dropout(backend, p, position, dtype, lora_dtype):
    # x of rank 1 to 4; bias on for some dtype/dropout pairs and off for the others (every
    # dtype pair sees both). Sizes are multiples of 16 so that the variants compiled here
    # serve the other tests too; K = 96, N = 80 still end in partial tiles.
    bias = (DTYPE_COMBOS.index((dtype, lora_dtype)) + DROPOUTS.index((p, position))) % 2 == 0
    for i, lead_shape in enumerate([(), (33,), (3, 11), (3, 1, 11)]):
        inputs = make_inputs(lead_shape, 96, 80, 16, dtype, lora_dtype, bias=bias, seed=i)
        run_and_check(inputs, 0.5, p, position, 1000 + i, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r,p,position", [(1, 0.0, "post"), (1, 0.25, "pre"), (3, 0.25, "post"), (64, 0.25, "post"),
                                          (128, 0.0, "post"), (256, 0.25, "pre")])
def test_numerics_ranks(backend, r, p, position):
    inputs = make_inputs((2, 45), 96, 80, r, torch.bfloat16, seed=r)
    run_and_check(inputs, 2.0, p, position, 77, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (16, 4096, 1024), (2048, 1024, 1024)], ids=str)
@pytest.mark.parametrize("p,position", DROPOUTS, ids=["no_dropout", "pre", "post"])
def test_numerics_decode_and_training_shapes(backend, shape, p, position):
    """Real sizes: decode (row split into partials), and M = 2048 (reductions split over M)."""
    M, K, N = shape
    inputs = make_inputs((M,), K, N, 16, torch.bfloat16, seed=M)
    run_and_check(inputs, 2.0, p, position, 4321, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_weight_and_zero_tokens(backend):
    inputs = make_inputs((33,), 96, 80, 16, torch.float16, torch.float32, weight=False)
    run_and_check(inputs, 0.5, 0.25, "post", 5, backend)
    inputs = make_inputs((2, 0), 96, 80, 16, torch.bfloat16)
    run_and_check(inputs, 0.5, 0.25, "pre", 5, backend)


# ---------------------------------------------------------------------------
# Dropout: mask statistics, mask = reference mask, forward/backward agreement, determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_post_dropout_mask_is_the_reference_mask(backend, p):
    M, K, N, r = 512, 64, 256, 16
    inputs = make_inputs((M,), K, N, r, torch.float32, weight=False, bias=False, requires_grad=False)
    y, _ = torch.ops.lora.linear(inputs["x"], None, None, inputs["lora_A"], inputs["lora_B"], 1.0, p, "post",
                                 seed_tensor(2024), backend)
    kept = (y != 0).cpu()
    assert torch.equal(kept, dropout_keep_mask(2024, M, N, p))
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_pre_dropout_mask_is_the_reference_mask(backend, p):
    # With lora_A = I (r = K), xa = drop(x): its zeros are the mask.
    M, K = 512, 64
    # CUDA's float32 randn returns an exact 0 about once in 10^7 elements, which reads as dropped
    # where the mask keeps it: in 7 of 2,400 draws of this x (H200, 2026-12-06,
    # scripts/pre_mask_stress.py; each of the 14 mismatches in 2,900 trials was an x of 0, kept
    # by the mask). So x has no zeros.
    x = torch.randn(M, K, device=DEVICE)
    x = torch.where(x == 0, torch.ones_like(x), x)
    eye = torch.eye(K, device=DEVICE)
    _, xa = torch.ops.lora.linear(x, None, None, eye, torch.randn(8, K, device=DEVICE), 1.0, p, "pre",
                                  seed_tensor(-77), backend)
    kept = (xa != 0).cpu()
    assert torch.equal(kept, dropout_keep_mask(-77, M, K, p))
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(xa[kept.to(DEVICE)], (x / (1 - p))[kept.to(DEVICE)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", ["pre", "post"])
def test_backward_regenerates_the_forward_mask(backend, position):
    """Gradients equal the reference's for the same seed: a different mask in backward would not."""
    inputs = make_inputs((300,), 128, 96, 8, torch.float32)
    run_and_check(inputs, 1.5, 0.5, position, 99, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_gives_bitwise_equal_results(backend):
    inputs = make_inputs((4, 300), 256, 192, 16, torch.bfloat16)
    leaves = list(present(inputs).values())
    args = [inputs[k] for k in GRAD_NAMES]
    grad_y = torch.randn(4, 300, 192, device=DEVICE, dtype=torch.bfloat16)

    def run(seed_value, position):
        y, xa = torch.ops.lora.linear(*args, 2.0, 0.3, position, seed_tensor(seed_value), backend)
        return (y, xa, *torch.autograd.grad(y, leaves, grad_y))

    for position in ("pre", "post"):
        first, second, other = run(11, position), run(11, position), run(12, position)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), position
        assert not torch.equal(first[0], other[0]), position


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("position", ["pre", "post"])
def test_compile_fullgraph_equals_eager(mode, position):
    torch._dynamo.reset()
    inputs = make_inputs((4, 64), 96, 80, 16, torch.bfloat16)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    seed = seed_tensor(5)

    def layer(x, A, B):
        return lora_ext.ops.linear(x, w.detach(), b.detach(), A, B, 2.0, 0.2, position, seed)

    assert_compiled_equals_eager(layer, (x, A, B), torch.randn(4, 64, 80, device=DEVICE, dtype=torch.bfloat16), mode)


def assert_compiled_equals_eager(layer, leaves, grad_y, mode):
    """torch.compile(layer, fullgraph) gives eager's y and gradients bitwise, three calls in a row
    (reduce-overhead: warm-up, record, replay of the CUDA graph)."""
    compiled = torch.compile(layer, fullgraph=True, mode=mode)
    y_eager = layer(*leaves)
    grads_eager = torch.autograd.grad(y_eager, list(leaves), grad_y)
    for _ in range(3):
        y = compiled(*leaves)
        grads = torch.autograd.grad(y, list(leaves), grad_y)
        torch.testing.assert_close(y.clone(), y_eager, rtol=0, atol=0)
        for g, g_eager in zip(grads, grads_eager):
            torch.testing.assert_close(g.clone(), g_eager, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Triton vs native
# ---------------------------------------------------------------------------


@pytest.mark.skipif(BACKENDS != ["triton", "native"], reason="needs both triton and the native CUDA build")
@pytest.mark.parametrize("p,position", DROPOUTS, ids=["no_dropout", "pre", "post"])
@pytest.mark.parametrize("dtype,lora_dtype", DTYPE_COMBOS, ids=lambda d: str(d).replace("torch.", ""))
def test_triton_and_native_agree(p, position, dtype, lora_dtype):
    inputs = make_inputs((3, 50), 96, 80, 16, dtype, lora_dtype)
    leaves = list(present(inputs).values())
    args = [inputs[k] for k in GRAD_NAMES]
    seed = seed_tensor(8) if p > 0 else None
    grad_y = torch.randn(3, 50, 80, device=DEVICE, dtype=dtype)
    results = {}
    for backend in ("triton", "native"):
        y, xa = torch.ops.lora.linear(*args, 2.0, p, position, seed, backend)
        results[backend] = (y, xa, *torch.autograd.grad(y, leaves, grad_y))
    tol = EPS[least_precise(dtype, lora_dtype)]
    for name, a, b in zip(("y", "xa", *present(inputs)), results["triton"], results["native"]):
        bound = 2 * tol * max(b.abs().max().item(), 1e-3)
        assert max_abs_diff(a, b) <= bound, f"{name}: triton and native differ by {max_abs_diff(a, b):.3g}"


def python_route_then_replayed(fn):
    """(fn() with the C++ replay of Triton pieces off, fn() twice with it on (the first records the
    keys it has not seen), the replay stats before those two, and after)."""
    with switched(lora_ext._C.set_triton_replay, False):
        python_route = fn()
    before = lora_ext._C.triton_replay_stats()
    first, second = fn(), fn()
    return python_route, first, second, before, lora_ext._C.triton_replay_stats()


@pytest.mark.skipif(BACKENDS != ["triton", "native"], reason="needs both triton and the native CUDA build")
@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_replayed_masked_pieces_equal_the_python_route(position, dtype):
    """The native path's dropout pieces, replayed from C++ (csrc/triton_replay.h), give
    bitwise the results of the Python route, and are replayed (the recording works on
    this triton)."""
    # N = 84 is not a multiple of 8: the 'post' backward then runs the Triton masked_grad_y
    # piece, not the native kernel (csrc/cuda/masked_grad_y.cu, tested below).
    inputs = make_inputs((5, 77), 96, 84, 16, dtype, dtype)
    leaves = list(present(inputs).values())
    args = [inputs[k] for k in GRAD_NAMES]
    grad_y = torch.randn(5, 77, 84, device=DEVICE, dtype=dtype)

    def fwd_bwd():
        y, xa = torch.ops.lora.linear(*args, 2.0, 0.25, position, seed_tensor(11), "native")
        return (y, xa, *torch.autograd.grad(y, leaves, grad_y))

    python_route, first, second, before, (recorded, not_replayable, replayed) = python_route_then_replayed(fwd_bwd)
    pieces_per_step = 2 if position == "pre" else 1  # pre: masked_down + masked_up; post: masked_grad_y
    assert recorded >= pieces_per_step and not_replayable == before[1], (before, (recorded, not_replayable))
    assert replayed - before[2] >= pieces_per_step
    for name, a, b, c in zip(("y", "xa", *present(inputs)), python_route, first, second):
        assert torch.equal(a, b) and torch.equal(a, c), f"{name}: replay differs from the Python route"


@pytest.mark.skipif(BACKENDS != ["triton", "native"], reason="needs both triton and the native CUDA build")
def test_replay_runs_in_a_thread_whose_first_cuda_work_it_is():
    """A 'pre' dropout forward (two replayed Triton pieces before any cuBLAS call) recorded on this
    thread, then run from a new thread: the device is already the runtime's current one there (no
    cudaSetDevice) and the outputs come from the caching allocator, so no runtime call has made a
    driver context current when the replay loads and launches its kernels. It must run, replayed,
    with the same bits."""
    import threading

    inputs = make_inputs((64,), 96, 80, 16, torch.bfloat16, requires_grad=False, seed=31)
    args = (*(inputs[k] for k in GRAD_NAMES), 0.5, 0.25, "pre", seed_tensor(5), "native")
    expected = torch.ops.lora.linear(*args)[0]
    assert torch.equal(torch.ops.lora.linear(*args)[0], expected)  # recorded, then replayed here
    torch.cuda.synchronize()
    result = {}

    def worker():
        try:
            before = lora_ext._C.triton_replay_stats()[2]
            result["y"] = torch.ops.lora.linear(*args)[0]
            torch.cuda.synchronize()
            result["replayed"] = lora_ext._C.triton_replay_stats()[2] - before
        except Exception as error:  # reported below, in the test's thread
            result["error"] = error

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "error" not in result, f"replay from a fresh thread failed: {result.get('error')}"
    assert result["replayed"] >= 1 and torch.equal(result["y"], expected)


# ---------------------------------------------------------------------------
# The native 'post' backward step (csrc/cuda/masked_grad_y.cu)
# ---------------------------------------------------------------------------

native_only = pytest.mark.skipif(not lora_ext._C.has_cuda(), reason="needs the native CUDA build")


def _grad_y_inputs(M, N, r, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g = torch.randn(M, N, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    B = (torch.randn(N, r, generator=gen, dtype=torch.float64) / math.sqrt(r)).to(DEVICE, dtype)
    xa = torch.randn(M, r, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    return g, B, xa


@native_only
@pytest.mark.parametrize("M,N,r", [(1, 8, 1), (63, 136, 3), (200, 264, 16), (130, 1032, 17), (257, 512, 33),
                                   (64, 128, 64), (1000, 4104, 16), (77, 392, 50)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_masked_grad_y_matches_float64(M, N, r, dtype):
    """dxa = s drop(dY) B and dB = s drop(dY)^T xa against float64 with the numpy mask, on
    sizes that leave partial row and column tiles, ranks padded to 16 / 32 / 64, and several
    row and column groups (M = 1000, N = 4104)."""
    g, B, xa = _grad_y_inputs(M, N, r, dtype)
    p, scale, seed_value = 0.3, 0.7, 4242
    assert lora_ext._C.masked_grad_y_cuda_supports(g, B, xa)
    grad_xa, grad_B = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, True)
    dropped = g.double().cpu() * dropout_keep_mask(seed_value, M, N, p).double() / (1 - p)
    expected_xa = scale * dropped @ B.double().cpu()
    expected_B = scale * dropped.t() @ xa.double().cpu()
    for what, actual, expected in (("dxa", grad_xa, expected_xa), ("dB", grad_B, expected_B)):
        assert actual.dtype == dtype and actual.shape == expected.shape, f"{what}: {actual.dtype} {actual.shape}"
        assert_relative_error(actual, expected, what, 4 * EPS[dtype], floor=1.0)
    # Asked for one output only, it gives bitwise that output; and twice the same bits.
    only_xa = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, False)
    only_B = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, False, True)
    assert only_xa[1].numel() == 0 and only_B[0].numel() == 0
    assert torch.equal(only_xa[0], grad_xa) and torch.equal(only_B[1], grad_B)
    # The cp.async load scheme (off by default, NOTES.md #36, #55) feeds the same products the same
    # masked tiles: within the same bound, and above r = 16 (one program per SM either way, so the
    # same split of the sums) the same bits; at r <= 16 it runs three programs per SM instead of
    # two, so its sums are split differently. Either way one output alone gives that output's bits.
    with switched(lora_ext._C.set_masked_grad_y_stages, 3) as previous:
        piped = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, True)
        piped_xa = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, False)[0]
    assert previous == 0
    for what, actual, expected in (("piped dxa", piped[0], expected_xa), ("piped dB", piped[1], expected_B)):
        assert_relative_error(actual, expected, what, 4 * EPS[dtype], floor=1.0)
    assert torch.equal(piped_xa, piped[0])
    if r > 16:
        assert torch.equal(piped[0], grad_xa) and torch.equal(piped[1], grad_B)


@native_only
@pytest.mark.parametrize("r", [16, 24, 64])
def test_native_masked_grad_y_reads_misaligned_thin_operands(r):
    """The kernel reads B and xa as 16-byte vectors; views that start 2 bytes off that alignment go through
    zero-padded copies instead. The padding columns are zeros in either route, so the misaligned views give
    the aligned copies' bits, and both agree with float64."""
    M, N, dtype = 300, 1032, torch.bfloat16
    g, B, xa = _grad_y_inputs(M, N, r, dtype, seed=5)
    # The same values one element into fresh storage: a data pointer at 2 mod 16 bytes.
    B_off = torch.empty(N * r + 1, device=DEVICE, dtype=dtype)[1:].view(N, r).copy_(B)
    xa_off = torch.empty(M * r + 1, device=DEVICE, dtype=dtype)[1:].view(M, r).copy_(xa)
    assert B_off.data_ptr() % 16 == 2 and xa_off.data_ptr() % 16 == 2 and B_off.is_contiguous()
    p, scale, seed_value = 0.25, 0.9, 31
    aligned = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, True)
    dropped = g.double().cpu() * dropout_keep_mask(seed_value, M, N, p).double() / (1 - p)
    expected = (scale * dropped @ B.double().cpu(), scale * dropped.t() @ xa.double().cpu())
    for B_in, xa_in in ((B_off, xa), (B, xa_off), (B_off, xa_off)):
        out = lora_ext._C.masked_grad_y_cuda(g, B_in, xa_in, scale, seed_tensor(seed_value), p, True, True)
        for what, actual, reference, exact in (("dxa", out[0], expected[0], aligned[0]),
                                               ("dB", out[1], expected[1], aligned[1])):
            assert_relative_error(actual, reference, what, 4 * EPS[dtype], floor=1.0)
            assert torch.equal(actual, exact), what
    # The cp.async load scheme reads the thin operands the same way: misaligned views, the aligned run's bits.
    with switched(lora_ext._C.set_masked_grad_y_stages, 3):
        piped = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, True)
        piped_off = lora_ext._C.masked_grad_y_cuda(g, B_off, xa_off, scale, seed_tensor(seed_value), p, True, True)
    assert torch.equal(piped_off[0], piped[0]) and torch.equal(piped_off[1], piped[1])
    assert_relative_error(piped_off[0], expected[0], "piped dxa", 4 * EPS[dtype], floor=1.0)


@native_only
def test_native_masked_grad_y_keeps_nan_and_handles_zero_rows():
    g, B, xa = _grad_y_inputs(40, 64, 8, torch.bfloat16, seed=1)
    g[3, 5] = float("nan")  # dropped or kept, a NaN in dY reaches dB's row 5 and dxa's row 3
    grad_xa, grad_B = lora_ext._C.masked_grad_y_cuda(g, B, xa, 1.0, seed_tensor(9), 0.5, True, True)
    assert grad_xa[3].isnan().all() and grad_B[5].isnan().all()
    assert grad_xa[[0, 1, 2, 4]].isfinite().all() and grad_B[[0, 1, 2, 4]].isfinite().all()
    empty = torch.empty(0, 64, device=DEVICE, dtype=torch.bfloat16)
    grad_xa, grad_B = lora_ext._C.masked_grad_y_cuda(empty, B, xa[:0], 1.0, seed_tensor(9), 0.5, True, True)
    assert grad_xa.shape == (0, 8) and torch.equal(grad_B, torch.zeros_like(B))


@native_only
def test_native_masked_grad_y_stages_setting():
    with pytest.raises(RuntimeError, match="takes 0 or 3"):
        lora_ext._C.set_masked_grad_y_stages(2)
    assert lora_ext._C.set_masked_grad_y_stages(0) == 0  # the default (no LORA_EXT_MASKED_GRAD_Y_STAGES here)
    with pytest.raises(RuntimeError, match="takes 'balanced' or 'sqrt', got 'square'"):
        lora_ext._C.set_masked_grad_y_grid_rule("square")
    assert lora_ext._C.set_masked_grad_y_grid_rule("balanced") == "balanced"  # the default (no LORA_EXT_MASKED_GRAD_Y_GRID)


@native_only
@pytest.mark.parametrize("M,N,r", [(64, 128 * 600, 16), (64, 128 * 600, 64), (2048, 8200, 16), (1000, 4104, 40)],
                         ids=str)
def test_native_masked_grad_y_grid_rules(M, N, r):
    """Both splits of the step's work (csrc/masked_grad_y_grid.h: 'balanced', the default since NOTES.md #56,
    and the first rule 'sqrt', kept for A/B runs) against float64, each with the grid the launch takes
    from masked_grad_y_grid for this GPU's SMs. At 64 x 76 800 the balanced split gives each program
    several column blocks on any GPU with fewer than 300 slots, so the grad_xa partial's
    read-modify-write across column blocks runs; a cap on the partials below the first rule's is not
    taken (the launch never allocates more than it did, nor less). At r = 64 (16 warps, grad_xa's rows
    in rank halves) the read-modify-write runs on each half's own columns of the partial."""
    dtype = torch.bfloat16
    g, B, xa = _grad_y_inputs(M, N, r, dtype, seed=3)
    p, scale, seed_value = 0.2, 1.3, 77
    dropped = g.double().cpu() * dropout_keep_mask(seed_value, M, N, p).double() / (1 - p)
    expected_xa, expected_B = scale * dropped @ B.double().cpu(), scale * dropped.t() @ xa.double().cpu()
    slots = (2 if r <= 16 else 1) * torch.cuda.get_device_properties(DEVICE).multi_processor_count
    outputs = {}
    for rule in ("balanced", "sqrt"):
        with switched(lora_ext._C.set_masked_grad_y_grid_rule, rule) as previous:
            outputs[rule] = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, True)
            capped = lora_ext._C.masked_grad_y_cuda(g, B, xa, scale, seed_tensor(seed_value), p, True, True,
                                                    max_partial_bytes=1)
        assert previous == "balanced"  # the default, and restored after each rule
        for what, actual, expected in (("dxa", outputs[rule][0], expected_xa), ("dB", outputs[rule][1], expected_B)):
            assert_relative_error(actual, expected, f"{rule} {what}", 4 * EPS[dtype], floor=1.0)
        assert torch.equal(capped[0], outputs[rule][0]) and torch.equal(capped[1], outputs[rule][1])
    if (M, N) == (64, 128 * 600):
        assert lora_ext._C.masked_grad_y_grid(M, N, r, slots)["blocks_c_per_group"] > 1


@native_only
def test_native_masked_grad_y_refuses_what_it_does_not_support():
    g, B, xa = _grad_y_inputs(16, 64, 8, torch.bfloat16)
    supports = lora_ext._C.masked_grad_y_cuda_supports
    assert not supports(g[:, :60].contiguous(), B[:60], xa)  # N % 8 != 0
    assert not supports(g.t().contiguous().t(), B, xa)  # not contiguous
    assert not supports(g, B.float(), xa.float())  # float32 adapters
    assert not supports(g.float(), B.float(), xa.float())  # float32 dY
    assert not supports(*_grad_y_inputs(16, 64, 65, torch.bfloat16))  # rank > 64
    assert not supports(g, B.cpu(), xa) and not supports(g, B, xa.cpu())  # on another device
    with pytest.raises(RuntimeError, match="does not support"):
        lora_ext._C.masked_grad_y_cuda(g, B.float(), xa.float(), 1.0, seed_tensor(1), 0.1, True, True)


@native_only
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_post_backward_over_wide_grad_y_at_rank_above_32_runs_the_native_step():
    """'post' dropout, dY 8192+ wide: at r > 32 the masked step is the native kernel, as at r = 16 (Triton's
    two passes until #79 made the native step faster there, NOTES.md #32, #80: they were one more replayed
    piece per backward); both within the float64 bound. The profiler sees the native kernel launched at
    each rank (equal replay counts alone would also pass with both ranks on Triton)."""
    from torch.profiler import ProfilerActivity, profile

    replayed, native_launches = {}, {}
    for r in (40, 16):
        inputs = make_inputs((64,), 64, 8200, r, torch.bfloat16, seed=r)
        run_and_check(inputs, 0.5, 0.1, "post", 5, "native")  # records the keys
        before = lora_ext._C.triton_replay_stats()[2]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_and_check(inputs, 0.5, 0.1, "post", 5, "native")
            torch.cuda.synchronize()
        replayed[r] = lora_ext._C.triton_replay_stats()[2] - before
        native_launches[r] = sum(e.count for e in prof.key_averages() if "masked_grad_y_kernel" in e.key)
    assert replayed[40] == replayed[16]
    assert native_launches[40] >= 1 and native_launches[16] >= 1, native_launches


# The subprocess of test_native_kernels_can_be_turned_off_by_environment (scripts/h200_run.sh exitprobe
# runs it under gdb).
NATIVE_KERNELS_OFF_ENV = {"LORA_EXT_NATIVE_GRAD_Y": "0", "LORA_EXT_SMALL_M_FORWARD": "0", "LORA_EXT_FUSED_FORWARD": "0",
                          "LORA_EXT_FUSED_SMALL_M_FORWARD": "0"}
NATIVE_KERNELS_OFF_SCRIPT = textwrap.dedent("""
    import torch, lora_ext
    from lora_ext.reference import lora_linear_reference
    g = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(128, 8, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(64, 8, device="cuda", dtype=torch.bfloat16)
    assert not lora_ext._C.masked_grad_y_cuda_supports(g, B, xa)
    assert lora_ext._C.set_small_m_forward(False) is False  # the previous setting: off from the environment
    assert lora_ext._C.set_fused_forward(False) is False  # LORA_EXT_FUSED_FORWARD=0 turned it off
    assert lora_ext._C.set_fused_small_m_forward(False) is False  # LORA_EXT_FUSED_SMALL_M_FORWARD=0 too
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16) / 8
    A = (torch.randn(8, 64, device="cuda", dtype=torch.bfloat16) / 8).requires_grad_()
    Bp = B.clone().requires_grad_()
    seed = torch.tensor([5], device="cuda")
    for p in (0.0, 0.25):  # 4 tokens without dropout: the few-token kernel's fallback; with: the masked step's
        y, _ = torch.ops.lora.linear(x, w, None, A, Bp, 0.5, p, "post", seed if p else None, "native")
        ref = lora_linear_reference(x.double(), w.double(), None, A.double(), Bp.double(), 0.5, p, "post",
                                    seed if p else None, compute_dtype=torch.float64)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, A, Bp], gy)
        want = torch.autograd.grad(ref, [x, A, Bp], gy.double())
        assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max(), p
        for a, b in zip(got, want):
            assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max(), p
    print("ok", flush=True)
    # Exit without interpreter finalization: autograd's CUDA worker thread may still be releasing the last
    # backward's tensors, and one whose Python object it must decref then takes the GIL during
    # finalization, where CPython 3.12 ends the thread with pthread_exit and the forced unwind through
    # torch's noexcept thread_main aborts ("terminate called without an active exception": the C++
    # stack of 12-05 12:04, NOTES.md #49; pytorch/pytorch#38230). Nothing of this library is on that stack.
    import os
    os._exit(0)
""")


@native_only
def test_native_kernels_can_be_turned_off_by_environment():
    """LORA_EXT_NATIVE_GRAD_Y=0 and LORA_EXT_SMALL_M_FORWARD=0 (read once per process) turn the two
    native kernels off and LORA_EXT_FUSED_FORWARD=0 / LORA_EXT_FUSED_SMALL_M_FORWARD=0 the fused forwards;
    the op still gives the right answer on the paths it falls back to."""
    script = NATIVE_KERNELS_OFF_SCRIPT
    # The subprocess aborted at exit inside the GPU suite (12-05, not alone; NOTES.md #39, #49: a race of
    # torch's autograd thread with interpreter finalization, so the script now ends with os._exit): faulthandler
    # prints every thread's Python stack in the message, LORA_EXT_TERMINATE_BACKTRACE=1 the C++ one.
    env = dict(os.environ, **NATIVE_KERNELS_OFF_ENV, LORA_EXT_TERMINATE_BACKTRACE="1")
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@native_only
@pytest.mark.skipif("triton" not in BACKENDS, reason="the chunked reference mask uses the Triton Philox")
def test_native_masked_grad_y_past_2_31_elements():
    """dY of (2**31 / 4096 + 3) x 4096 bf16 (4 GiB) through csrc/cuda/masked_grad_y.cu: row offsets and
    Philox group indices pass 2**31."""
    from lora_ext.kernels.philox import keep_mask_range

    torch.manual_seed(0)
    N, r, p, s, seed_value = 4096, 16, 0.1, 0.5, 987654321
    M = 2**31 // N + 3
    g = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
    assert g.numel() > 2**31
    B = (torch.randn(N, r, device=DEVICE) * r**-0.5).to(torch.bfloat16)
    xa = torch.randn(M, r, device=DEVICE, dtype=torch.bfloat16)
    seed = seed_tensor(seed_value)
    assert lora_ext._C.masked_grad_y_cuda_supports(g, B, xa)
    grad_xa, grad_B = lora_ext._C.masked_grad_y_cuda(g, B, xa, s, seed, p, True, True)

    # Sampled rows of dxa, including the last ones whose elements sit past index 2**31 (numpy mask).
    rows = np.array([0, 1, 12345, M // 2, 2**31 // N - 1, M - 3, M - 2, M - 1])
    rows_t = torch.from_numpy(rows).to(DEVICE)
    keep = _rows_keep_mask(seed_value, rows, N, p).to(DEVICE).double() / (1 - p)
    assert_relative_error(grad_xa[rows_t], s * (g[rows_t].double() * keep) @ B.double(), "grad_xa rows", 1e-2)
    # dB sums over all M rows: float32 chunks, each chunk's mask from the Triton Philox.
    grad_B_ref = torch.zeros(N, r, device=DEVICE, dtype=torch.float64)
    chunk = 32768
    for start in range(0, M, chunk):
        stop = min(M, start + chunk)
        keep_chunk = keep_mask_range(seed, start * N, (stop - start) * N, p).view(stop - start, N)
        dropped = g[start:stop].float() * keep_chunk / (1 - p)
        grad_B_ref += (s * dropped.t() @ xa[start:stop].float()).double()
    assert_relative_error(grad_B, grad_B_ref, "grad_B", 2e-2)


# ---------------------------------------------------------------------------
# The few-token forward (csrc/cuda/small_m_forward.cu)
# ---------------------------------------------------------------------------

# (M, K, N, r): one row (decode), partial row fragments, K not a multiple of 16 nor of the 8 K-slices,
# ranks padded to 16 / 32 / 64, blocks with two column chunks (N = 14336 with 3 row groups: 5
# clusters for 56 chunks), the largest M (8 row groups), K smaller than the cluster's slices; then
# 16-block clusters (long K): down's decode at r = 64, K past 8192 at r = 16 with one row and a
# partial last chunk, K just past 4096 at a rank padded to 64.
SMALL_M_SHAPES = [(1, 64, 8, 1), (5, 130, 96, 7), (16, 4096, 4096, 16), (17, 258, 514, 33), (40, 512, 14336, 16),
                  (128, 1024, 264, 64), (3, 2, 2, 3), (16, 14336, 4096, 64), (1, 9000, 520, 16), (3, 4098, 64, 40)]


@native_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_small_m_forward_cluster_size_rule(dtype):
    """16-block clusters exactly where 8 K-slices would leave step 1 more than one round of loads per
    warp (8 k-steps in flight at r <= 16, 4 above; NOTES.md #51), where the driver says they fit:
    on a whole H100/H200 (132 SMs); on a smaller slice (MIG) the wide case may stay at 8."""
    def blocks(M, K, N, r):
        x, A, B = (torch.randn(*shape, device=DEVICE, dtype=dtype) for shape in ((M, K), (r, K), (N, r)))
        return lora_ext._C.small_m_forward_cluster_blocks(x, A, B)

    # What a long K gets on this device, per kernel (ranks padded to 16, and 40 and 64 both to 64): 16,
    # or 8 where the driver says 16 does not fit (a smaller slice such as MIG).
    wide16, wide64 = blocks(16, 8194, 64, 16), blocks(3, 4098, 64, 40)
    assert wide16 in (8, 16) and wide64 in (8, 16)
    if torch.cuda.get_device_properties(DEVICE).multi_processor_count >= 132:
        assert wide16 == wide64 == 16, "16-block clusters fit on a whole Hopper GPU"
    # r <= 16: 8192 inputs are 512 k-steps, 64 per block, 8 per warp: one round.
    assert blocks(16, 8192, 64, 16) == 8
    assert blocks(1, 4096, 4096, 16) == 8 and blocks(16, 14336, 4096, 16) == wide16
    # r in 17..64: four k-steps in flight, so past 4096 inputs.
    assert blocks(16, 4096, 64, 64) == 8 and blocks(16, 14336, 4096, 64) == wide64
    with pytest.raises(RuntimeError, match="small_m_forward_cluster_blocks"):
        blocks(16, 4095, 64, 16)  # odd K: not supported by the kernel at all


@native_only
@pytest.mark.parametrize("M,K,N,r", SMALL_M_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_small_m_forward_kernel_matches_float64(M, K, N, r, dtype):
    """y += s (x A^T) B^T and xa = x A^T, against float64; twice gives the same bits."""
    gen = torch.Generator(device="cpu").manual_seed(M * 7 + r)
    x, A, B, y0 = (torch.randn(*shape, generator=gen, dtype=torch.float64) * std
                   for shape, std in (((M, K), 1.0), ((r, K), K**-0.5), ((N, r), r**-0.5), ((M, N), 1.0)))
    x, A, B, y0 = (t.to(DEVICE, dtype) for t in (x, A, B, y0))
    scale = 1.7
    assert lora_ext._C.small_m_forward_cuda_supports(x, A, B)
    y, xa = y0.clone(), torch.full((M, r), float("nan"), device=DEVICE, dtype=dtype)
    lora_ext._C.small_m_forward_cuda(x, A, B, y, xa, scale)
    xa_ref = x.double() @ A.double().t()
    y_ref = y0.double() + scale * (xa.double() @ B.double().t())  # from the xa it returned (rounded to dtype)
    for what, actual, expected in (("xa", xa, xa_ref), ("y", y, y_ref)):
        assert_relative_error(actual, expected, what, 2 * EPS[dtype], floor=1.0)
    y_again, xa_again = y0.clone(), torch.empty_like(xa)
    lora_ext._C.small_m_forward_cuda(x, A, B, y_again, xa_again, scale)
    assert torch.equal(y_again, y) and torch.equal(xa_again, xa)


@native_only
@pytest.mark.parametrize("M,K,N,r", SMALL_M_SHAPES[:4], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_small_m_forward_is_what_the_op_runs(M, K, N, r, bias):
    """The op's dropout-free forward at few tokens is cuBLAS's x W^T + b, then this kernel:
    bitwise (so the op does take the path), and its y and every gradient are within the
    float64 bound (run_and_check)."""
    inputs = make_inputs((M,), K, N, r, torch.bfloat16, bias=bias, seed=M + r)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    # Up to 16 rows the fused Triton forward runs first by default (NOTES.md #44): off, to test this path.
    with switched(lora_ext._C.set_fused_small_m_forward, False):
        y, xa, _ = run_and_check(inputs, 0.5, 0.0, "post", 0, "native")
    with torch.no_grad():
        expected = torch.addmm(b, x, w.t()) if bias else x @ w.t()
        expected_xa = torch.empty(M, r, device=DEVICE, dtype=torch.bfloat16)
        lora_ext._C.small_m_forward_cuda(x, A, B, expected, expected_xa, 0.5)
    assert torch.equal(y, expected) and torch.equal(xa, expected_xa)


@native_only
def test_small_m_forward_is_not_used_for_wide_layers_above_16_rows():
    """From 17 rows on, wide layers (K + N > 8192) keep the general path (cuBLAS; NOTES.md #24):
    the op gives the general path's bits there, and the kernel's at 16 rows."""
    for M, expect_kernel in ((16, True), (40, False)):
        inputs = make_inputs((M,), 512, 8192, 16, torch.bfloat16, bias=False, requires_grad=False, seed=M)
        x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
        args = (x, w, None, A, B, 0.5, 0.0, "post", None, "native")
        with switched(lora_ext._C.set_fused_small_m_forward, False):  # on by default up to 16 rows (#44)
            with switched(lora_ext._C.set_small_m_forward, False):
                general, _ = torch.ops.lora.linear(*args)
            default, _ = torch.ops.lora.linear(*args)
        kernel = x @ w.t()
        lora_ext._C.small_m_forward_cuda(x, A, B, kernel, torch.empty(M, 16, device=DEVICE, dtype=x.dtype), 0.5)
        assert not torch.equal(general, kernel)  # the two paths round differently: the check can tell them apart
        assert torch.equal(default, kernel if expect_kernel else general), f"M={M}"


@native_only
def test_small_m_forward_keeps_nan_at_scale_zero_and_refuses_what_it_does_not_support():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    A = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    B = torch.randn(32, 8, device=DEVICE, dtype=torch.bfloat16)
    B[5, 2] = float("nan")  # 0 * NaN is NaN (the reference): row 5 of B reaches y's column 5
    y, xa = torch.zeros(4, 32, device=DEVICE, dtype=torch.bfloat16), torch.empty(4, 8, device=DEVICE, dtype=torch.bfloat16)
    lora_ext._C.small_m_forward_cuda(x, A, B, y, xa, 0.0)
    assert y[:, 5].isnan().all() and torch.equal(y[:, :5], torch.zeros_like(y[:, :5]))
    supports = lora_ext._C.small_m_forward_cuda_supports
    assert not supports(torch.randn(129, 64, device=DEVICE, dtype=torch.bfloat16), A, B)  # more rows than the path
    assert not supports(torch.randn(4, 63, device=DEVICE, dtype=torch.bfloat16), A[:, :63].contiguous(), B)  # odd K
    assert not supports(x, A, B[:31].contiguous())  # odd N
    assert not supports(x.float(), A.float(), B.float())  # float32
    assert not supports(x, A.half(), B.half())  # adapters in another dtype
    assert not supports(x, torch.randn(65, 64, device=DEVICE, dtype=torch.bfloat16),
                        torch.randn(32, 65, device=DEVICE, dtype=torch.bfloat16))  # rank > 64
    assert not supports(x.t().contiguous().t(), A, B)  # not contiguous
    assert not supports(x, A.cpu(), B) and not supports(x, A, B.cpu())  # adapters on another device
    assert not supports(x, A[:, :32].contiguous(), B)  # A's columns are not x's features
    assert not supports(x, A, B[:, :4].contiguous())  # B's columns are not A's rank
    assert not supports(x, A.reshape(8, 4, 16), B)  # A not a matrix
    with pytest.raises(RuntimeError, match="does not support"):
        lora_ext._C.small_m_forward_cuda(x.float(), A.float(), B.float(), y.float(), xa.float(), 1.0)
    with pytest.raises(RuntimeError, match="on x's device"):
        lora_ext._C.small_m_forward_cuda(x, A, B, y.cpu(), xa, 1.0)
    with pytest.raises(RuntimeError, match="needs xa"):
        lora_ext._C.small_m_forward_cuda(x, A, B, y, xa[:, :7], 1.0)


@native_only
@pytest.mark.parametrize("r", [3, 8, 16])
def test_small_m_forward_keeps_an_inf_in_x_as_inf(r):
    """An Inf in x with positive W, A and B: y's row is +Inf in every column, as the float64
    reference, for ranks padded to 16 (3, 8) and not (16). The padding ranks' sums (Inf * 0 = NaN)
    must not reach y through B's zero padding."""
    M, K, N = 2, 64, 32
    x = torch.rand(M, K, device=DEVICE, dtype=torch.float64)
    x[0, 0] = float("inf")
    A, B = (torch.rand(*shape, device=DEVICE, dtype=torch.float64) + 0.1 for shape in ((r, K), (N, r)))
    y0 = torch.rand(M, N, device=DEVICE, dtype=torch.float64)
    x, A, B, y = (t.to(torch.bfloat16) for t in (x, A, B, y0))
    xa = torch.empty(M, r, device=DEVICE, dtype=torch.bfloat16)
    lora_ext._C.small_m_forward_cuda(x, A, B, y, xa, 0.5)
    ref = y0 + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and not bool(torch.isnan(y).any())
    assert bool(torch.isinf(y[0]).all()) and bool(torch.isfinite(y[1]).all())


@native_only
@pytest.mark.parametrize("position", ["pre", "post"])
def test_float64_dropout_keeps_its_keep_scale_in_float64(position):
    """float64 on CUDA with dropout: the native path scales a dropped copy with its mask kernel. Within
    the float64 bound (1e-12) of the reference; a keep scale 1 / (1 - p) rounded to float32 (off by
    ~5e-8 at p = 0.1) is far outside it."""
    inputs = make_inputs((33,), 96, 80, 16, torch.float64, seed=3)
    run_and_check(inputs, 0.5, 0.1, position, 21, "native")


# ---------------------------------------------------------------------------
# The fused forward GEMM (lora_ext/kernels/fused_forward.py), run by the native path for
# dropout-free k/v-sized layers at training sizes (csrc/lora_aten.cpp, use_fused_forward)
# ---------------------------------------------------------------------------


def _fused_forward_available():
    if not (lora_ext._C.has_cuda() and "triton" in BACKENDS and torch.cuda.is_available()):
        return False
    from lora_ext.kernels import fused_forward

    return fused_forward.TensorDescriptor is not None and torch.cuda.get_device_capability()[0] >= 9


fused_only = pytest.mark.skipif(not _fused_forward_available(),
                                reason="needs sm_90+, triton with tensor descriptors and the native CUDA build")


def _switched_on(set_enabled):
    """For a fixture: a native-path switch on for one test, then back as it was."""
    with switched(set_enabled, True):
        yield


@pytest.fixture
def fused_forward_on():
    """The op's fused forward on for one test (the default, unless LORA_EXT_FUSED_FORWARD=0)."""
    yield from _switched_on(lora_ext._C.set_fused_forward)


# (M, K, N, r): tails in every dimension (M past a 128-row block, K past a 64-wide step, N past a
# 256-wide tile), the ranks padded to 16 and to 64, a k/v shape of Llama-3-8B.
FUSED_SHAPES = [(300, 264, 1032, 8), (257, 128, 4096, 64), (4100, 4096, 1024, 16)]


@fused_only
@pytest.mark.parametrize("M,K,N,r", FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_forward_kernel_matches_float64(M, K, N, r, p, dtype):
    """y and xa against float64 within the same-dtype bound, with bias; the scale makes the LoRA term
    the larger part of y. Twice gives the same bits (no cross-program reduction)."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs((M,), K, N, r, dtype, requires_grad=False, seed=M + r)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    scale, seed = 3.0, seed_tensor(77) if p > 0 else None
    assert fused_forward.supports(x, w, b, A, B)
    y, xa = fused_forward.linear_forward(x, w, b, A, B, scale, p, seed)
    ref = lora_linear_reference(x, w, b, A, B, scale, p, "post", seed, compute_dtype=torch.float64)
    same = lora_linear_reference(x, w, b, A, B, scale, p, "post", seed, compute_dtype=dtype)
    assert_within_bound(y, ref, same, dtype, "y")
    xa_ref = x.double() @ A.double().t()
    assert_within_bound(xa, xa_ref, x @ A.t(), dtype, "xa")
    y_again, xa_again = fused_forward.linear_forward(x, w, b, A, B, scale, p, seed)
    assert torch.equal(y_again, y) and torch.equal(xa_again, xa)


@pytest.fixture
def fused_grad_input_on():
    """The op's fused input gradient on for one test."""
    yield from _switched_on(lora_ext._C.set_fused_grad_input)


@fused_only
@pytest.mark.parametrize("M,K,N,r", FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_grad_input_kernel_matches_float64(M, K, N, r, dtype):
    """dx = g W + (s g B) A and s g B against float64 within the same-dtype bound; the scale makes the
    LoRA term the larger part of dx. Twice gives the same bits."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs((M,), K, N, r, dtype, bias=False, requires_grad=False, seed=M + r + 1)
    _, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
    g = torch.randn(M, N, device=DEVICE, dtype=dtype)
    scale = 3.0
    assert fused_forward.grad_input_supports(g, w, A, B)
    grad_x, g_b = fused_forward.grad_input(g, w, A, B, scale)
    g_b_ref = g.double() @ B.double()
    ref = g.double() @ w.double() + scale * g_b_ref @ A.double()
    same = g @ w + (scale * (g @ B)) @ A
    assert_within_bound(grad_x, ref, same, dtype, "dx")
    assert_within_bound(g_b, scale * g_b_ref, scale * (g @ B), dtype, "s g B")
    again = fused_forward.grad_input(g, w, A, B, scale)
    assert torch.equal(again[0], grad_x) and torch.equal(again[1], g_b)


@fused_only
@pytest.mark.parametrize("lead_shape", [(4100,), (2, 2048)], ids=str)
def test_fused_grad_input_is_what_the_op_runs(lead_shape, fused_grad_input_on):
    """Turned on, the dropout-free backward of a k/v-sized layer at 4096+ rows: dx is the fused
    kernel's bits (replayed from C++ from the second call), every gradient within the float64
    bound (run_and_check); turned off the op composes cuBLAS calls, which round differently."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs(lead_shape, 512, 1032, 16, torch.bfloat16, seed=12)
    run_and_check(inputs, 0.5, 0.0, "post", 0, "native")
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    gy = torch.randn(*lead_shape, 1032, device=DEVICE, dtype=torch.bfloat16)

    def grad_x():
        y, _ = torch.ops.lora.linear(x, w, b, A, B, 0.5, 0.0, "post", None, "native")
        return torch.autograd.grad(y, [x], gy)[0]

    first = grad_x()  # the keys were recorded by run_and_check's call, or now
    before = lora_ext._C.triton_replay_stats()[2]
    second = grad_x()
    assert lora_ext._C.triton_replay_stats()[2] - before == 2  # the forward and the input gradient
    expected, _ = fused_forward.grad_input(gy.reshape(-1, 1032), w.detach(), A.detach(), B.detach(), 0.5)
    assert torch.equal(first.reshape(-1, 512), expected) and torch.equal(second, first)
    with switched(lora_ext._C.set_fused_grad_input, False):
        composed = grad_x()
    assert not torch.equal(composed, first)


@fused_only
@pytest.mark.parametrize("lead_shape,bias,r,K,N", [((4100,), True, 16, 512, 1032), ((2, 2050), False, 16, 512, 1032),
                                                  ((4100,), False, 64, 512, 1032), ((4100,), True, 16, 2048, 2056),
                                                  ((4100,), False, 8, 512, 1032)],
                         ids=str)
def test_fused_forward_is_what_the_op_runs(lead_shape, bias, r, K, N, fused_forward_on):
    """Turned on, a dropout-free layer at 4096+ rows, k/v-sized (N <= 2048) or wider with K <= 2048 at
    r <= 16: the op's y and xa are the fused kernel's bits, y and every gradient are within the
    float64 bound (run_and_check), and turned off the op composes cuBLAS calls, which round differently.
    r = 8 too: it measured 15-19 points slower than r = 16 where the fused forward runs (benchmarks/NOTES.md
    #61), so that the route is not the suspect."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs(lead_shape, K, N, r, torch.bfloat16, bias=bias, seed=11)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    y, xa, _ = run_and_check(inputs, 0.5, 0.0, "post", 0, "native")  # r = 64: dx composed (cuBLAS), dA and dB in one launch
    with torch.no_grad():
        expected_y, expected_xa = fused_forward.linear_forward(x.reshape(-1, K), w, b, A, B, 0.5)
        assert torch.equal(y.reshape(-1, N), expected_y) and torch.equal(xa, expected_xa)
        with switched(lora_ext._C.set_fused_forward, False) as previous:
            composed, _ = torch.ops.lora.linear(x, w, b, A, B, 0.5, 0.0, "post", None, "native")
    assert previous is True and not torch.equal(composed, y)


@pytest.fixture
def fused_small_m_forward_on():
    """The op's fused forward for few tokens on for one test (the default, unless
    LORA_EXT_FUSED_SMALL_M_FORWARD=0)."""
    yield from _switched_on(lora_ext._C.set_fused_small_m_forward)


# (M, K, N, r) for the few-row tiles (small_m_config): one row at q/o and k/v sizes (decode), K and N
# tails against the tiles (K = 264: a 256-wide step and a tail; N = 1032 and 520: partial column
# blocks), r padded to 16 and 64, and 64 rows at gate/up's width (wgmma).
SMALL_M_FUSED_SHAPES = [(1, 4096, 4096, 16), (1, 4096, 1024, 16), (16, 264, 1032, 8), (5, 512, 520, 64),
                        (64, 1024, 14336, 16)]


@fused_only
@pytest.mark.parametrize("M,K,N,r", SMALL_M_FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_forward_small_m_tiles_match_float64(M, K, N, r, dtype):
    """The fused forward with the tiles it takes up to 64 rows: y and xa against float64 within the
    same-dtype bound, with bias; the scale makes the LoRA term the larger part of y. Twice gives the
    same bits."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs((M,), K, N, r, dtype, requires_grad=False, seed=M + N + r)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    assert fused_forward.supports(x, w, b, A, B)
    y, xa = fused_forward.linear_forward(x, w, b, A, B, 3.0)
    ref = lora_linear_reference(x, w, b, A, B, 3.0, compute_dtype=torch.float64)
    same = lora_linear_reference(x, w, b, A, B, 3.0, compute_dtype=dtype)
    assert_within_bound(y, ref, same, dtype, "y")
    assert_within_bound(xa, x.double() @ A.double().t(), x @ A.t(), dtype, "xa")
    y_again, xa_again = fused_forward.linear_forward(x, w, b, A, B, 3.0)
    assert torch.equal(y_again, y) and torch.equal(xa_again, xa)


@fused_only
@pytest.mark.parametrize("lead_shape,bias,r", [((1,), True, 16), ((2, 8), False, 16), ((4, 1), True, 64)], ids=str)
def test_fused_small_m_forward_is_what_the_op_runs(lead_shape, bias, r, fused_small_m_forward_on):
    """Turned on, a dropout-free forward of up to 16 rows: the op's y and xa are the fused kernel's
    bits, replayed from C++ from the second call with the key; y and every gradient are within the
    float64 bound (run_and_check); turned off, the few-token kernel runs, which rounds differently."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs(lead_shape, 512, 1032, r, torch.bfloat16, bias=bias, seed=13)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    y, xa, _ = run_and_check(inputs, 0.5, 0.0, "post", 0, "native")

    def forward():
        return torch.ops.lora.linear(x, w, b, A, B, 0.5, 0.0, "post", None, "native")

    with torch.no_grad():
        expected_y, expected_xa = fused_forward.linear_forward(x.reshape(-1, 512), w, b, A, B, 0.5)
        assert torch.equal(y.reshape(-1, 1032), expected_y) and torch.equal(xa, expected_xa)
        before = lora_ext._C.triton_replay_stats()[2]
        again, _ = forward()
        assert lora_ext._C.triton_replay_stats()[2] - before == 1 and torch.equal(again, y)
        with switched(lora_ext._C.set_fused_small_m_forward, False) as previous:
            kernel, _ = forward()
    assert previous is True and not torch.equal(kernel, y)


@fused_only
def test_fused_small_m_forward_is_not_used_past_16_rows_with_dropout_or_where_it_declines(fused_small_m_forward_on):
    """Turned on, 17 rows, 'post' dropout, rows TMA cannot address (K = 260: 520 bytes) and more than
    8192 inputs (down-sized: the per-program x A^T recompute loses there, NOTES.md #48) keep the path
    they had with it off (bitwise); the check tells the paths apart at 16 rows and at 8192 inputs."""

    def op_bits(M, K, p, fused):
        inputs = make_inputs((M,), K, 1032, 16, torch.bfloat16, bias=False, requires_grad=False, seed=M + K)
        x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
        seed = seed_tensor(5) if p > 0 else None
        with switched(lora_ext._C.set_fused_small_m_forward, fused):
            return torch.ops.lora.linear(x, w, None, A, B, 0.5, p, "post", seed, "native")[0]

    for what, (M, K, p) in {"17 rows": (17, 512, 0.0), "dropout": (8, 512, 0.1), "K = 260": (8, 260, 0.0),
                            "K = 8200": (8, 8200, 0.0)}.items():
        assert torch.equal(op_bits(M, K, p, True), op_bits(M, K, p, False)), what
    assert not torch.equal(op_bits(16, 512, 0.0, True), op_bits(16, 512, 0.0, False))
    assert not torch.equal(op_bits(8, 8192, 0.0, True), op_bits(8, 8192, 0.0, False))


# ---------------------------------------------------------------------------
# Both adapter gradients in one launch (lora_ext/kernels/adapter_grads.py), run by the native
# path's dropout-free backward from 4096 rows (csrc/lora_aten.cpp, use_fused_adapter_grads)
# ---------------------------------------------------------------------------

native_triton_only = pytest.mark.skipif(not (lora_ext._C.has_cuda() and "triton" in BACKENDS),
                                        reason="needs triton and the native CUDA build")


@native_triton_only
@pytest.mark.parametrize("M,K,N,r", [(4100, 4096, 1024, 16), (1000, 520, 1032, 64), (257, 72, 40, 8),
                                     (4100, 4096, 1024, 8), (300, 264, 136, 24)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adapter_grads_kernel_matches_float64(M, K, N, r, dtype):
    """dA = s_A grad_xa^T x and dB = s_B g^T xa against float64 within the bound of the same products
    in the dtype (cuBLAS); g as a strided view. Twice gives the same bits (one summation order). dA alone
    and dB alone (their own launches, tiles and grids) within the same bounds. Where the 16-byte rank hint
    applies (r = 8, 24: NOTES.md #63), the launch without it gives the same bits: it changes how grad_xa
    and xa are loaded, not the sums."""
    from lora_ext.kernels import adapter_grads

    gen = torch.Generator(device="cpu").manual_seed(M + r)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    grad_xa, xa, x, g = randn(M, r), randn(M, r), randn(M, K), randn(M, 2 * N)[:, ::2]
    assert adapter_grads.supported(grad_xa, x, xa, g)
    grad_A, grad_B = adapter_grads.adapter_grads(grad_xa, x, xa, g, 0.5, 3.0)
    assert_within_bound(grad_A, 0.5 * grad_xa.double().t() @ x.double(), 0.5 * (grad_xa.t() @ x), dtype, "dA")
    assert_within_bound(grad_B, 3.0 * g.double().t() @ xa.double(), 3.0 * (g.t() @ xa), dtype, "dB")
    again = adapter_grads.adapter_grads(grad_xa, x, xa, g, 0.5, 3.0)
    assert torch.equal(again[0], grad_A) and torch.equal(again[1], grad_B)
    alone_A, alone_B = adapter_grads.grad_A_only(grad_xa, x, 0.5), adapter_grads.grad_B_only(xa, g, 3.0)
    assert_within_bound(alone_A, 0.5 * grad_xa.double().t() @ x.double(), 0.5 * (grad_xa.t() @ x), dtype, "dA alone")
    assert_within_bound(alone_B, 3.0 * g.double().t() @ xa.double(), 3.0 * (g.t() @ xa), dtype, "dB alone")
    if adapter_grads.rank_alignment(r, grad_xa.stride(0), xa.stride(0)) > 1:
        plain = adapter_grads.adapter_grads(grad_xa, x, xa, g, 0.5, 3.0, rank_align=1)
        assert torch.equal(plain[0], grad_A) and torch.equal(plain[1], grad_B)


def _adapter_grads_operands(x, w, A, B, gy, scale):
    """(xa, grad_xa) as the native dropout-free backward hands them to the adapter-gradient launch:
    xa from the forward, grad_xa = s g B from the fused input gradient where it runs (Hopper, r <= 16,
    N <= 2048 or K <= 2048 with N <= 8192: csrc/lora_aten.cpp use_fused_grad_input), else from cuBLAS."""
    from lora_ext.kernels import fused_forward

    _, xa = torch.ops.lora.linear(x, w, None, A, B, scale, 0.0, "post", None, "native")
    (N, r), M, K = B.shape, gy.shape[0], x.shape[1]
    if _fused_forward_available() and r <= 16 and (N <= 2048 or (K <= 2048 and N <= 8192)):
        return xa, fused_forward.grad_input(gy, w, A, B, scale)[1]
    return xa, torch.addmm(torch.empty(M, r, device=DEVICE, dtype=B.dtype), gy, B, beta=0, alpha=scale)


@pytest.fixture
def fused_adapter_grads_on():
    """The op's one-launch adapter gradients on for one test (the default; a test may have turned it off)."""
    yield from _switched_on(lora_ext._C.set_fused_adapter_grads)


@native_triton_only
@pytest.mark.parametrize("K,N,r", [(512, 1032, 16), (520, 2048, 64)], ids=str)
def test_adapter_grads_are_what_the_op_runs(K, N, r, fused_adapter_grads_on):
    """The dropout-free backward at 4096+ rows with every gradient wanted: within the float64 bound
    (run_and_check), dA and dB are the one-launch kernel's bits (replayed from C++ from the second
    call: one more replayed piece than with it off). Its grad_xa = s g B: r = 16 at N <= 2048 on
    Hopper from the fused input gradient, else from cuBLAS."""
    from lora_ext.kernels import adapter_grads

    M, scale = 4100, 0.5
    inputs = make_inputs((M,), K, N, r, torch.bfloat16, seed=13)
    run_and_check(inputs, scale, 0.0, "post", 0, "native")
    leaves = [inputs[k] for k in GRAD_NAMES]
    x, w, _, A, B = (t.detach() for t in leaves)
    gy = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)

    def grads():
        y, _ = torch.ops.lora.linear(*leaves, scale, 0.0, "post", None, "native")
        return torch.autograd.grad(y, [inputs["x"], inputs["lora_A"], inputs["lora_B"]], gy)

    first = grads()
    replayed = lora_ext._C.triton_replay_stats()[2]
    second = grads()
    with_it = lora_ext._C.triton_replay_stats()[2] - replayed
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with torch.no_grad():
        xa, grad_xa = _adapter_grads_operands(x, w, A, B, gy, scale)
        expected = adapter_grads.adapter_grads(grad_xa, x, xa, gy, 1.0, scale)
    assert torch.equal(first[1], expected[0]) and torch.equal(first[2], expected[1])
    with switched(lora_ext._C.set_fused_adapter_grads, False):
        replayed = lora_ext._C.triton_replay_stats()[2]
        composed = grads()
        without_it = lora_ext._C.triton_replay_stats()[2] - replayed
    assert with_it == without_it + 1
    assert torch.equal(composed[0], first[0])  # dx does not depend on it


@native_triton_only
def test_adapter_grads_dA_alone_is_what_the_post_backward_runs(fused_adapter_grads_on):
    """'post' dropout at 4096+ rows with the one launch on: dB comes from the masked step, and dA is
    grad_A_only's bits on the masked step's grad_xa; every gradient within the float64 bound
    (run_and_check); turned off, cuBLAS's dA (another summation order)."""
    from lora_ext.kernels import adapter_grads

    M, K, N, r, p, scale, seed_value = 4100, 512, 1032, 16, 0.25, 0.5, 7
    inputs = make_inputs((M,), K, N, r, torch.bfloat16, seed=19)
    run_and_check(inputs, scale, p, "post", seed_value, "native")
    leaves = [inputs[k] for k in GRAD_NAMES]
    x, w, _, A, B = (t.detach() for t in leaves)
    seed = seed_tensor(seed_value)
    gy = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)

    def grad_A():
        y, _ = torch.ops.lora.linear(*leaves, scale, p, "post", seed, "native")
        return torch.autograd.grad(y, [inputs["lora_A"]], gy)[0]

    got = grad_A()
    with torch.no_grad():
        _, xa = torch.ops.lora.linear(x, w, None, A, B, scale, p, "post", seed, "native")
        grad_xa, _ = lora_ext._C.masked_grad_y_cuda(gy, B, xa, scale, seed, p, True, False)
        assert torch.equal(got, adapter_grads.grad_A_only(grad_xa, x, 1.0))
    with switched(lora_ext._C.set_fused_adapter_grads, False):
        composed = grad_A()
    assert not torch.equal(composed, got)


@fused_only
def test_adapter_grads_apart_free_grad_xa_before_dB(fused_adapter_grads_on):
    """Where the one launch's xa, grad_xa, dA and dB pass the memory budget and dA, then dB with grad_xa
    released, fit it (csrc/lora_aten.cpp split_adapter_grads_for_memory; NOTES.md #58), the dropout-free
    backward runs the kernel's dA programs and then its dB programs: dA and dB are grad_A_only's and
    grad_B_only's bits, every gradient within the float64 bound, and the backward's peak is lower than
    with the one launch (budget 0) by exactly grad_xa's allocation (here the smaller of grad_xa and dB).
    The budget is set for this test's small layer: 410 KB together, 279 KB apart. The peak is read in
    the caching allocator's small pool (blocks up to 1 MiB: grad_xa, dA, dB), where each allocation is
    its size rounded to 512 bytes; dx's large block may be a cached block of another size."""
    from lora_ext.kernels import adapter_grads

    M, K, N, r, scale = 4100, 512, 4104, 16, 0.5
    together = (2 * M * r + r * K + N * r) * 2
    apart = (M * r + r * K + max(M * r, N * r)) * 2
    budget = (together + apart) // 2
    inputs = make_inputs((M,), K, N, r, torch.bfloat16, bias=False, seed=23)
    leaves = [inputs[k] for k in GRAD_NAMES]
    x, w, A, B = (inputs[k].detach() for k in ("x", "weight", "lora_A", "lora_B"))
    gy = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
    wanted = [inputs["x"], inputs["lora_A"], inputs["lora_B"]]

    def small_pool(stat):
        return torch.cuda.memory_stats()[f"allocated_bytes.small_pool.{stat}"]

    def grads_and_peak(memory_budget):
        """(gradients, small-pool peak over its bytes at the start, small-pool bytes freed) of one backward."""
        with switched(lora_ext._C.set_adapter_grads_memory_budget, memory_budget):
            y, _ = torch.ops.lora.linear(*leaves, scale, 0.0, "post", None, "native")
            warm_up = torch.autograd.grad(y, wanted, gy, retain_graph=True)  # records the pieces
            # Nothing of an earlier call may be freed inside the measured window: that would lower
            # the pool's bytes under `before` and so the peak read. On the H200 (2026-12-06 03:57)
            # this test read 131,584 bytes with budget 0 after 23 other tests in its xdist worker,
            # where alone it read the 279,552 of grad_xa + dA + dB: 147,968 short, the size of dA + dB
            # (or of grad_xa + dA). The warm-up's dA and dB fit: the autograd engine's GraphTask keeps
            # the returned gradients in its future (markCompleted(vars)) until its last reference
            # goes, which the CUDA device thread may drop after torch.autograd.grad has returned,
            # i.e. inside the window. So the warm-up's gradients stay alive to the end, garbage is
            # collected before and not inside, and the bytes freed inside are reported with the
            # peaks.
            was_enabled = gc.isenabled()
            gc.collect()
            gc.disable()
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before, freed_before = small_pool("current"), small_pool("freed")
                grads = torch.autograd.grad(y, wanted, gy)
                torch.cuda.synchronize()
                peak, freed = small_pool("peak") - before, small_pool("freed") - freed_before
            finally:
                if was_enabled:
                    gc.enable()
            del warm_up
            return grads, peak, freed

    with switched(lora_ext._C.set_adapter_grads_memory_budget, budget):
        run_and_check(inputs, scale, 0.0, "post", 0, "native")
    apart_grads, apart_peak, apart_freed = grads_and_peak(budget)
    together_grads, together_peak, together_freed = grads_and_peak(0)
    with torch.no_grad():
        xa, grad_xa = _adapter_grads_operands(x, w, A, B, gy, scale)
        assert torch.equal(apart_grads[1], adapter_grads.grad_A_only(grad_xa, x, 1.0))
        assert torch.equal(apart_grads[2], adapter_grads.grad_B_only(xa, gy, scale))
    assert torch.equal(apart_grads[0], together_grads[0])  # dx does not depend on it
    allocation = -(-min(M * r, N * r) * 2 // 512) * 512  # the caching allocator's 512-byte rounding
    assert together_peak - apart_peak == allocation, \
        dict(together_peak=together_peak, apart_peak=apart_peak, allocation=allocation,
             together_freed=together_freed, apart_freed=apart_freed)


@native_triton_only
@pytest.mark.parametrize("r,p,any_width_rank,wide_runs_it",
                         [(16, 0.0, 16, True), (24, 0.0, 16, False), (16, 0.25, 16, True), (24, 0.25, 16, False),
                          (24, 0.0, 64, True)],
                         ids=["both_r16", "both_r24", "dA_alone_r16", "dA_alone_r24", "both_r24_limit_raised"])
def test_adapter_grads_width_rule(fused_adapter_grads_on, r, p, any_width_rank, wide_runs_it):
    """On (the default): at 2048 outputs the one launch runs (other bits than cuBLAS's); past 2048
    (2056, q/o-sized) dA and dB together at r <= 16 run there (measured faster than cuBLAS at every
    shape, benchmarks/NOTES.md #40), and dA alone ('post' dropout) at r <= 16 (#94); r > 16 keeps
    cuBLAS's dA and dB past 2048 (not measured there): the same bits as with the switch off; with the rank limit
    raised (set_fused_adapter_grads_any_width_max_rank, for the probes) r = 24 runs there too. K = 2048: with dropout dB
    comes from the masked step either way, and only dA's 16 x 2048 values tell the paths apart (at
    16 x 256 two summation orders can round every value alike)."""
    def adapter_grads_bits(N, one_launch):
        inputs = make_inputs((4100,), 2048, N, r, torch.bfloat16, bias=False, seed=N)
        leaves = [inputs[k] for k in GRAD_NAMES]
        gy = torch.randn(4100, N, generator=torch.Generator().manual_seed(N)).to(DEVICE, torch.bfloat16)
        with switched(lora_ext._C.set_fused_adapter_grads, one_launch), \
                switched(lora_ext._C.set_fused_adapter_grads_any_width_max_rank, any_width_rank):
            y, _ = torch.ops.lora.linear(*leaves, 0.5, p, "post", seed_tensor(3) if p else None, "native")
            return torch.autograd.grad(y, [inputs["lora_A"], inputs["lora_B"]], gy)

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    assert not same(adapter_grads_bits(2048, True), adapter_grads_bits(2048, False))
    assert same(adapter_grads_bits(2056, True), adapter_grads_bits(2056, False)) != wide_runs_it


@fused_only
def test_triton_backend_forward_is_the_fused_kernel_from_4096_rows():
    """backend 'triton', dropout-free, 4096+ rows on Hopper: y and xa are the fused kernel's bits and
    y and every gradient are within the float64 bound; at 4095 rows the thin kernels + cuBLAS run."""
    from lora_ext.kernels import fused_forward

    for M, fused in ((4100, True), (4095, False)):
        inputs = make_inputs((M,), 256, 4104, 16, torch.bfloat16, seed=M)
        x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
        y, xa, _ = run_and_check(inputs, 0.5, 0.0, "post", 0, "triton")
        with torch.no_grad():
            kernel_y, kernel_xa = fused_forward.linear_forward(x, w, b, A, B, 0.5)
        if fused:
            assert torch.equal(y, kernel_y) and torch.equal(xa, kernel_xa), f"M={M}: not the fused kernel's bits"
        else:  # the composed path rounds the LoRA term once more: the check tells the paths apart
            assert not torch.equal(y, kernel_y), f"M={M}: the fused kernel ran below FUSED_FORWARD_MIN_ROWS"


@pytest.fixture
def fused_post_dropout_on():
    """The op's fused GEMMs with 'post' dropout on for one test (the default; a test may have turned it off)."""
    yield from _switched_on(lora_ext._C.set_fused_post_dropout)


@fused_only
# r = 8: slower than r = 16 where the fused GEMMs run (benchmarks/NOTES.md #61): the route is checked here.
@pytest.mark.parametrize("lead_shape,bias,r", [((4100,), True, 16), ((2, 2050), False, 64), ((4100,), False, 8)],
                         ids=str)
def test_fused_post_dropout_gemms_are_what_the_op_runs(lead_shape, bias, r, fused_forward_on, fused_grad_input_on,
                                                      fused_post_dropout_on):
    """Turned on, 'post' dropout at a k/v-sized layer with 4096+ rows: the op's y and xa are the fused
    forward's bits (the mask in its epilogue); dx is the fused input gradient's bits with the masked
    step's grad_xa at every rank here (r = 64 too: the layer has 1032 <= 2048 outputs, NOTES.md #76); y and every
    gradient within the float64 bound; the forward replayed from C++ from the second call with the
    same bits; and turned off, the op composes (other rounding)."""
    from lora_ext.kernels import fused_forward

    p, seed_value, scale = 0.25, 5, 0.5
    inputs = make_inputs(lead_shape, 512, 1032, r, torch.bfloat16, bias=bias, seed=17)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    y, xa, _ = run_and_check(inputs, scale, p, "post", seed_value, "native")
    seed = seed_tensor(seed_value)
    gy = torch.randn_like(y)

    def forward_and_dx():
        out, _ = torch.ops.lora.linear(x, w, b, A, B, scale, p, "post", seed, "native")
        return out, torch.autograd.grad(out, [x], gy)[0]

    replayed = lora_ext._C.triton_replay_stats()[2]
    again, grad_x = forward_and_dx()
    assert lora_ext._C.triton_replay_stats()[2] > replayed and torch.equal(again, y)
    with switched(lora_ext._C.set_fused_post_dropout, False):
        composed_y, composed_dx = forward_and_dx()
    with torch.no_grad():
        x2, w_, A_, B_ = x.reshape(-1, 512).detach(), w.detach(), A.detach(), B.detach()
        expected_y, expected_xa = fused_forward.linear_forward(x2, w_, b if b is None else b.detach(), A_, B_, scale,
                                                               p, seed)
        assert torch.equal(y.reshape(-1, 1032), expected_y) and torch.equal(xa, expected_xa)
        g2 = gy.reshape(-1, 1032)
        # As the op calls it (dx wanted): partials capped at dx's size.
        grad_xa, _ = lora_ext._C.masked_grad_y_cuda(g2, B_, xa, scale, seed, p, True, False,
                                                    max_partial_bytes=x2.numel() * x2.element_size())
        expected_dx = fused_forward.grad_input_given_xa(g2, w_, A_, B_, grad_xa)
        assert torch.equal(grad_x.reshape(-1, 512), expected_dx)
        assert not torch.equal(grad_x, composed_dx)
    assert not torch.equal(composed_y, y)


@fused_only
def test_triton_backend_post_forward_is_the_fused_kernel_when_switched_on(fused_post_dropout_on):
    """backend 'triton', 'post' dropout, 4096+ rows, the switch on: y and xa are the fused kernel's
    bits (mask in its epilogue), y and every gradient within the float64 bound."""
    from lora_ext.kernels import fused_forward

    inputs = make_inputs((4100,), 256, 4104, 16, torch.bfloat16, seed=21)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    y, xa, _ = run_and_check(inputs, 0.5, 0.25, "post", 6, "triton")
    with torch.no_grad():
        kernel_y, kernel_xa = fused_forward.linear_forward(x, w, b, A, B, 0.5, 0.25, seed_tensor(6))
    assert torch.equal(y, kernel_y) and torch.equal(xa, kernel_xa)


@fused_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_post_dropout_forward_width_rule(backend, fused_forward_on, fused_post_dropout_on):
    """Turned on, a 'post' forward past 4096 input features composes (the same bits as with the switch
    off) unless the layer is k/v-wide (N <= 2048) with at most 8192 inputs, where it is the fused
    kernel's bits (NOTES.md #53), on either backend."""
    from lora_ext.kernels import fused_forward

    seed = seed_tensor(3)
    for K, N, fused in ((4104, 2056, False), (8200, 1024, False), (4104, 1024, True), (8192, 2048, True)):
        inputs = make_inputs((4096,), K, N, 16, torch.bfloat16, bias=False, requires_grad=False, seed=3)
        x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
        on = torch.ops.lora.linear(x, w, None, A, B, 0.5, 0.1, "post", seed, backend)[0]
        with switched(lora_ext._C.set_fused_post_dropout, False):
            off = torch.ops.lora.linear(x, w, None, A, B, 0.5, 0.1, "post", seed, backend)[0]
        if fused:
            kernel_y, _ = fused_forward.linear_forward(x, w, None, A, B, 0.5, 0.1, seed)
            assert torch.equal(on, kernel_y) and not torch.equal(on, off), (K, N)
        else:
            assert torch.equal(on, off), (K, N)


def _native_dx_beside_composed(K, N, r, dropout, scale, seed_value, input_seed):
    """The native backward's dx of a (4096, K) -> (4096, N) 'post' layer at rank r, after checking y and every
    gradient against float64; the same dx with the fused input gradient switched off (composed); and what the
    grad_xa-given kernel needs: (dx, composed_dx, gy, w, A, B, grad_xa), grad_xa from the masked step as the op
    calls it (partials capped at dx's size, csrc/masked_grad_y_grid.h) with dropout, None without."""
    inputs = make_inputs((4096,), K, N, r, torch.bfloat16, bias=False, seed=input_seed)
    run_and_check(inputs, scale, dropout, "post", seed_value, "native")
    x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
    seed = seed_tensor(seed_value) if dropout else None
    gy = torch.randn(4096, N, device=DEVICE, dtype=torch.bfloat16)

    def grad_x():
        y, _ = torch.ops.lora.linear(x, w, None, A, B, scale, dropout, "post", seed, "native")
        return torch.autograd.grad(y, [x], gy)[0]

    dx = grad_x()
    w_, A_, B_ = w.detach(), A.detach(), B.detach()
    grad_xa = None
    if dropout:
        with torch.no_grad():
            xa = x.detach() @ A_.t()
        grad_xa, _ = lora_ext._C.masked_grad_y_cuda(gy, B_, xa, scale, seed, dropout, True, False,
                                                    max_partial_bytes=x.numel() * x.element_size())
    switch = lora_ext._C.set_fused_post_dropout if dropout else lora_ext._C.set_fused_grad_input
    with switched(switch, False):
        composed_dx = grad_x()
    return dx, composed_dx, gy, w_, A_, B_, grad_xa


def _assert_dx_given_or_composed(given, dx, composed_dx, gy, w, A, B, grad_xa, scale, case):
    """dx is the grad_xa-given kernel's bits and not the composed path's where `given`, else the composed path's.
    grad_xa None (no dropout): s g B, as the dropout-free backward forms it (scaled_mm: addmm_out, beta = 0,
    alpha = s)."""
    from lora_ext.kernels import fused_forward

    if not given:
        assert torch.equal(dx, composed_dx), case
        return
    if grad_xa is None:
        grad_xa = torch.empty(gy.shape[0], B.shape[1], device=gy.device, dtype=gy.dtype)
        torch.addmm(grad_xa, gy, B, beta=0, alpha=scale, out=grad_xa)
    kernel_dx = fused_forward.grad_input_given_xa(gy, w, A, B, grad_xa)
    assert torch.equal(dx, kernel_dx) and not torch.equal(dx, composed_dx), case


@fused_only
def test_fused_grad_input_width_rule(fused_forward_on, fused_grad_input_on, fused_post_dropout_on):
    """The native backward's input gradient: dropout-free, fused (the kernel's bits, g B formed inside) where
    N <= 2048 or K <= 2048 with N <= 8192; else, with or without 'post' dropout, the grad_xa-given kernel where
    N <= 4096 or K <= 2048 at any N (NOTES.md #53, #92, #93, #95), composed where N > 4096 with K > 2048
    (gate/up's kind and wider). Every case within the float64 bound."""
    from lora_ext.kernels import fused_forward

    scale, p, seed_value = 0.5, 0.25, 7
    cases = [(0.0, 2048, 2056, "fused"), (0.0, 2048, 8192, "fused"), (0.0, 2048, 8200, "given"),
             (0.0, 2056, 2056, "given"), (0.0, 4096, 4104, "composed"),
             (p, 2048, 8200, "given"), (p, 2056, 2056, "given"), (p, 4096, 4096, "given"), (p, 4104, 2056, "given"),
             (p, 4104, 4104, "composed"), (p, 4096, 4104, "composed"), (p, 2056, 4104, "composed")]
    for dropout, K, N, route in cases:
        dx, composed_dx, gy, w, A, B, grad_xa = _native_dx_beside_composed(K, N, 16, dropout, scale, seed_value,
                                                                           input_seed=K + N)
        if route == "fused":
            kernel_dx, _ = fused_forward.grad_input(gy, w, A, B, scale)
            assert torch.equal(dx, kernel_dx) and not torch.equal(dx, composed_dx), (dropout, K, N)
        else:
            given = route == "given"
            _assert_dx_given_or_composed(given, dx, composed_dx, gy, w, A, B, grad_xa, scale, (dropout, K, N))


@fused_only
def test_given_xa_input_gradient_past_rank_16_at_k_v_widths(fused_forward_on, fused_grad_input_on,
                                                             fused_post_dropout_on):
    """Past r = 16 (to 64) where the layer has at most 2048 outputs (NOTES.md #76): the native backward's dx is
    the grad_xa-given kernel's bits, with and without 'post' dropout (grad_xa from the masked step, or from
    s g B); composed at r > 64 and at N > 2048. Every case within the float64 bound."""
    scale, seed_value = 0.5, 11
    cases = [(0.0, 32, 1024, True), (0.0, 64, 1024, True), (0.25, 64, 1024, True), (0.25, 48, 2048, True),
             (0.0, 64, 2056, False), (0.25, 64, 2056, False), (0.0, 72, 1024, False)]
    for dropout, r, N, given in cases:
        dx, composed_dx, gy, w, A, B, grad_xa = _native_dx_beside_composed(1024, N, r, dropout, scale, seed_value,
                                                                           input_seed=r + N)
        _assert_dx_given_or_composed(given, dx, composed_dx, gy, w, A, B, grad_xa, scale, (dropout, r, N))


@fused_only
def test_given_xa_input_gradient_where_dx_is_wider_than_4096(fused_forward_on, fused_grad_input_on,
                                                             fused_post_dropout_on):
    """Without dropout, up to r = 16, where the contraction is at most 4096 deep and the dropout-free fused kernel
    does not take the layer (NOTES.md #91, #95): the native backward's dx is the grad_xa-given kernel's bits
    (grad_xa = s g B, as the backward forms it for dA), dx wider than 4096 or not; composed at N > 4096 and at
    r = 32 (with 'post' dropout too: N = 2056 is past the k/v-width rule of r > 16). Every case within the
    float64 bound."""
    scale, seed_value = 0.5, 13
    cases = [(0.0, 4104, 2056, 16, True), (0.0, 4104, 4096, 16, True), (0.0, 4096, 2056, 16, True),
             (0.0, 4104, 4104, 16, False), (0.0, 4104, 2056, 32, False), (0.25, 4104, 2056, 32, False)]
    for dropout, K, N, r, given in cases:
        dx, composed_dx, gy, w, A, B, grad_xa = _native_dx_beside_composed(K, N, r, dropout, scale, seed_value,
                                                                           input_seed=K + N + r)
        _assert_dx_given_or_composed(given, dx, composed_dx, gy, w, A, B, grad_xa, scale, (dropout, K, N, r))


@fused_only
def test_opcheck_linear_on_the_fused_post_dropout_gemms(fused_forward_on, fused_grad_input_on, fused_post_dropout_on):
    inputs = make_inputs((4096,), 256, 1024, 16, torch.bfloat16, seed=5)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    torch.library.opcheck(torch.ops.lora.linear.default, (x, w.detach(), b.detach(), A, B, 0.5, 0.1, "post",
                                                          seed_tensor(9), "native"))


@fused_only
def test_fused_forward_is_not_used_outside_its_measured_range():
    """Turned on, with fewer than 4096 rows, N > 2048 with K > 2048 or r > 16, r > 64, dropout (the
    'post' fused GEMMs, which also need this switch, turned off here: test_fused_post_dropout_*), or a
    layout TMA cannot address: the op composes (its bits equal the composed path's). On by default;
    at any N where K <= 2048 and r <= 16."""
    assert lora_ext._C.set_fused_forward(True) is True  # the default (no LORA_EXT_FUSED_FORWARD=0 here)

    def op_bits(x, w, A, B, p, fused):
        with switched(lora_ext._C.set_fused_forward, fused), switched(lora_ext._C.set_fused_post_dropout, False):
            seed = seed_tensor(3) if p > 0 else None
            return torch.ops.lora.linear(x, w, None, A, B, 0.5, p, "post", seed, "native")[0]

    cases = {"4095 rows": (4095, 256, 1024, 16, 0.0), "N = K = 2056": (4096, 2056, 2056, 16, 0.0),
             "N = 2056, r = 24": (4096, 256, 2056, 24, 0.0),
             "r = 72": (4096, 256, 1024, 72, 0.0), "dropout": (4096, 256, 1024, 16, 0.1),
             "K = 260 (rows not 16-byte aligned)": (4096, 260, 1024, 16, 0.0)}
    for what, (M, K, N, r, p) in cases.items():
        inputs = make_inputs((M,), K, N, r, torch.bfloat16, bias=False, requires_grad=False, seed=M + N)
        x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
        assert torch.equal(op_bits(x, w, A, B, p, True), op_bits(x, w, A, B, p, False)), what
    # ...and the check can tell the paths apart where the kernel is used: N <= 2048, or any N at K <= 2048.
    for K, N in ((256, 1024), (2048, 2056)):
        inputs = make_inputs((4096,), K, N, 16, torch.bfloat16, bias=False, requires_grad=False, seed=1)
        x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
        assert not torch.equal(op_bits(x, w, A, B, 0.0, True), op_bits(x, w, A, B, 0.0, False)), (K, N)


@fused_only
@pytest.mark.skipif(BACKENDS != ["triton", "native"], reason="needs both triton and the native CUDA build")
@pytest.mark.parametrize("lead_shape,bias", [((4100,), True), ((2, 2048), False)], ids=str)
def test_replayed_fused_forward_equals_the_python_route(lead_shape, bias, fused_forward_on):
    """The fused forward launched from C++ (its TMA descriptors encoded there, triton_replay.h)
    gives bitwise the Python launch's y and xa, and is replayed on this triton (the recording
    understood the kernel's descriptor parameters). A key the callback declines (rows not 16-byte
    aligned) stays declined without a recipe or a Python route, and composes."""
    inputs = make_inputs(lead_shape, 512, 1032, 16, torch.bfloat16, bias=bias, requires_grad=False, seed=21)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)

    def forward():
        return torch.ops.lora.linear(x, w, b, A, B, 0.5, 0.0, "post", None, "native")

    python_route, first, second, before, (recorded, not_replayable, replayed) = python_route_then_replayed(forward)
    assert not_replayable == before[1] and recorded >= 1 and replayed - before[2] >= 1, (before, recorded, replayed)
    for name, a, b_, c in zip(("y", "xa"), python_route, first, second):
        assert torch.equal(a, b_) and torch.equal(a, c), f"{name}: the replay differs from the Python launch"

    inputs = make_inputs((4096,), 260, 1024, 16, torch.bfloat16, bias=False, requires_grad=False, seed=22)
    x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
    before = lora_ext._C.triton_replay_stats()
    declined = [torch.ops.lora.linear(x, w, None, A, B, 0.5, 0.0, "post", None, "native")[0] for _ in range(2)]
    assert lora_ext._C.triton_replay_stats()[1] == before[1]
    with switched(lora_ext._C.set_fused_forward, False):
        composed = torch.ops.lora.linear(x, w, None, A, B, 0.5, 0.0, "post", None, "native")[0]
    assert torch.equal(declined[0], composed) and torch.equal(declined[1], composed)


@fused_only
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_fullgraph_equals_eager_on_the_fused_gemms(mode, fused_forward_on, fused_grad_input_on):
    """A k/v-sized layer at 4096 tokens, dropout-free: the native path's fused forward and input gradient
    (Triton kernels called from C++, replayed from the second call) inside a compiled graph, and
    captured in a CUDA graph by reduce-overhead: the same bits as eager."""
    torch._dynamo.reset()
    inputs = make_inputs((2, 2048), 512, 1024, 16, torch.bfloat16, seed=41)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)

    def layer(x, A, B):
        return lora_ext.ops.linear(x, w.detach(), b.detach(), A, B, 2.0)

    assert_compiled_equals_eager(layer, (x, A, B), torch.randn(2, 2048, 1024, device=DEVICE, dtype=torch.bfloat16),
                                 mode)


@fused_only
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_fullgraph_equals_eager_on_the_fused_post_dropout_gemms(mode, fused_forward_on, fused_grad_input_on,
                                                                         fused_adapter_grads_on, fused_post_dropout_on):
    """The same with 'post' dropout 0.1 (on by default since 12-05): the fused forward with the mask in
    its epilogue, the native masked step, the fused input gradient given its grad_xa and dA in one
    launch, inside a compiled graph and a CUDA graph: eager's bits."""
    torch._dynamo.reset()
    inputs = make_inputs((2, 2048), 512, 1024, 16, torch.bfloat16, seed=43)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    seed = seed_tensor(11)

    def layer(x, A, B):
        return lora_ext.ops.linear(x, w.detach(), b.detach(), A, B, 2.0, dropout_p=0.1, seed=seed)

    assert_compiled_equals_eager(layer, (x, A, B), torch.randn(2, 2048, 1024, device=DEVICE, dtype=torch.bfloat16),
                                 mode)


@fused_only
def test_opcheck_linear_on_the_fused_forward(fused_forward_on, fused_grad_input_on):
    inputs = make_inputs((4096,), 256, 1024, 16, torch.bfloat16, seed=4)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    torch.library.opcheck(torch.ops.lora.linear.default, (x, w.detach(), b.detach(), A, B, 0.5, 0.0, "post", None,
                                                          "native"))


@fused_only
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_fullgraph_equals_eager_on_the_fused_small_m_forward(mode, fused_small_m_forward_on):
    """Few tokens (4 rows), dropout-free, the few-token fused forward switched on: inside a compiled
    graph and captured in a CUDA graph by reduce-overhead (a decode loop's mode), the same bits as
    eager, gradients included."""
    torch._dynamo.reset()
    inputs = make_inputs((4,), 512, 1032, 16, torch.bfloat16, seed=43)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)

    def layer(x, A, B):
        return lora_ext.ops.linear(x, w.detach(), b.detach(), A, B, 2.0)

    assert_compiled_equals_eager(layer, (x, A, B), torch.randn(4, 1032, device=DEVICE, dtype=torch.bfloat16), mode)


@fused_only
def test_opcheck_linear_on_the_fused_small_m_forward(fused_small_m_forward_on):
    inputs = make_inputs((2, 3), 256, 1032, 16, torch.bfloat16, seed=5)
    x, w, b, A, B = (inputs[k] for k in GRAD_NAMES)
    torch.library.opcheck(torch.ops.lora.linear.default, (x, w.detach(), b.detach(), A, B, 0.5, 0.0, "post", None,
                                                          "native"))


# ---------------------------------------------------------------------------
# More than 2**31 elements
# ---------------------------------------------------------------------------


def _rows_keep_mask(seed_value, rows, cols, p):
    """Keep-mask of the given global rows of an (M, cols) tensor (numpy Philox)."""
    index = rows.astype(np.uint64)[:, None] * np.uint64(cols) + np.arange(cols, dtype=np.uint64)[None, :]
    return torch.from_numpy(philox_mask_bits(seed_value, index) >= np.uint64(dropout_threshold(p)))


@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_more_than_2_31_input_elements(backend):
    """x of (2**31 / 4096 + 3) x 4096 bf16 (4 GiB): offsets and mask indices pass 2**31."""
    torch.manual_seed(0)
    K, N, r, p, s, seed_value = 4096, 64, 16, 0.1, 2.0, 123456789
    M = 2**31 // K + 3
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    w = (torch.randn(N, K, device=DEVICE) * K**-0.5).to(torch.bfloat16)
    b = torch.randn(N, device=DEVICE, dtype=torch.bfloat16)
    A = (torch.randn(r, K, device=DEVICE) * K**-0.5).to(torch.bfloat16)
    B = (torch.randn(N, r, device=DEVICE) * r**-0.5).to(torch.bfloat16)
    seed = seed_tensor(seed_value)

    y, xa = torch.ops.lora.linear(x, w, b, A, B, s, p, "pre", seed, backend)
    grad_y = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
    grad_x, _, _, grad_A, grad_B = torch.ops.lora.linear_backward(
        grad_y, x, w, A, B, xa, s, p, "pre", seed, [True, False, False, True, True], backend)

    # Sampled rows, including the last ones whose elements sit past index 2**31.
    rows = np.array([0, 1, 12345, M // 2, 2**31 // K - 1, M - 3, M - 2, M - 1])
    rows_t = torch.from_numpy(rows).to(DEVICE)
    keep = _rows_keep_mask(seed_value, rows, K, p).to(DEVICE).double() / (1 - p)
    x_rows, g_rows = x[rows_t].double(), grad_y[rows_t].double()
    xa_ref = (x_rows * keep) @ A.double().t()
    y_ref = x_rows @ w.double().t() + b.double() + s * xa_ref @ B.double().t()
    grad_xa_ref = s * g_rows @ B.double()
    grad_x_ref = g_rows @ w.double() + keep * (grad_xa_ref @ A.double())

    assert_relative_error(xa[rows_t], xa_ref, "xa rows", 1e-2)
    assert_relative_error(y[rows_t], y_ref, "y rows", 1e-2)
    assert_relative_error(grad_x[rows_t], grad_x_ref, "grad_x rows", 1e-2)

    # Full reductions over M, in float32 chunks; the mask of each chunk from the Triton
    # Philox (checked against numpy above and in the interpreter tests).
    from lora_ext.kernels.philox import keep_mask_range

    grad_A_ref = torch.zeros(r, K, device=DEVICE, dtype=torch.float64)
    grad_B_ref = torch.zeros(N, r, device=DEVICE, dtype=torch.float64)
    chunk = 32768
    for start in range(0, M, chunk):
        stop = min(M, start + chunk)
        g = grad_y[start:stop].float()
        keep_chunk = keep_mask_range(seed, start * K, (stop - start) * K, p).view(stop - start, K)
        x_drop = x[start:stop].float() * keep_chunk / (1 - p)
        grad_xa_chunk = s * g @ B.float()
        grad_A_ref += (grad_xa_chunk.t() @ x_drop).double()
        grad_B_ref += (s * g.t() @ xa[start:stop].float()).double()
    assert_relative_error(grad_A, grad_A_ref, "grad_A", 2e-2)
    assert_relative_error(grad_B, grad_B_ref, "grad_B", 2e-2)


# ---------------------------------------------------------------------------
# The 'post' backward in two halves (csrc/lora_autograd.cpp: lora::post_dropout_grad_y, xa released,
# lora::linear_backward_from_grad_xa; benchmarks/NOTES.md #74)
# ---------------------------------------------------------------------------


@native_only
@pytest.mark.parametrize("M,K,N,r", [(4096, 512, 1024, 16), (4100, 4096, 2056, 64), (300, 96, 136, 8)], ids=str)
def test_post_dropout_backward_halves_give_the_one_op_bits(M, K, N, r):
    """On the native path (its one-pass masked kernel, the fused dx GEMM given grad_xa and dA alone where
    their rules take the sizes, cuBLAS elsewhere) the two halves, which run when the graph is not kept,
    give lora::linear_backward's bits (retain_graph=True keeps that one op), each gradient within the
    float64 bound; and xa is no longer referenced when the second half starts."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    inputs = make_inputs((M,), K, N, r, torch.bfloat16, seed=M + r)
    leaves = present(inputs)
    seen = {}

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.setdefault("calls", []).append(str(func))
            if func is torch.ops.lora.post_dropout_grad_y.default:
                seen["xa"] = weakref.ref(args[2])
            if func is torch.ops.lora.linear_backward_from_grad_xa.default:
                seen["xa_alive"] = seen["xa"]() is not None
            return func(*args, **(kwargs or {}))

    run_and_check(inputs, 0.5, 0.25, "post", 31, "native")  # the halves (graph not kept), against float64
    # (Not `y, _ = ...`: a name bound to the second output, xa, would keep it alive.)
    y = torch.ops.lora.linear(*(inputs[k] for k in GRAD_NAMES), 0.5, 0.25, "post", seed_tensor(31), "native")[0]
    gy = torch.randn_like(y)
    one_op = torch.autograd.grad(y, list(leaves.values()), gy, retain_graph=True)
    with Probe():
        again = torch.autograd.grad(y, list(leaves.values()), gy)
    assert [c for c in seen["calls"] if c.startswith("lora.")] == [
        "lora.post_dropout_grad_y.default", "lora.linear_backward_from_grad_xa.default"], seen["calls"]
    assert seen["xa_alive"] is False
    for name, a, b in zip(leaves, one_op, again):
        assert torch.equal(a, b), f"grad of {name}: the halves differ from the one op"


@native_only
def test_opcheck_post_dropout_halves_on_cuda():
    inputs = make_inputs((4096,), 256, 1024, 16, torch.bfloat16, requires_grad=False, seed=6)
    x, w, _, A, B = (inputs[k] for k in GRAD_NAMES)
    gy = torch.randn(4096, 1024, device=DEVICE, dtype=torch.bfloat16)
    xa = torch.randn(4096, 16, device=DEVICE, dtype=torch.bfloat16)
    for need, cap in (([True, True], x.numel() * 2), ([True, False], 0), ([False, True], 0)):
        torch.library.opcheck(torch.ops.lora.post_dropout_grad_y.default, (gy, B, xa, 0.5, 0.1, seed_tensor(9), need, cap))
    for mask in ([True] * 4, [False, False, False, True]):
        torch.library.opcheck(torch.ops.lora.linear_backward_from_grad_xa.default, (gy, x, w, A, B, xa, mask))
