"""Hostile inputs: each gives a clear error naming the argument, or the reference's result.

Never a crash, a hang or a silently wrong result. Complements tests/test_ops.py (shape, dtype,
device, dropout_p and seed checks of the op), tests/test_config.py, tests/test_modules.py and
tests/test_adapters.py (missing, unexpected and mis-shaped keys, scale, pickle); nothing here
repeats those. Decisions tested here (and written in the README's "Limits and safety"):

- NaN/Inf in any input propagate exactly as in the float64 reference, dropout included: a
  dropped NaN/Inf becomes NaN (it is multiplied by 0, as torch's dropout does), never 0.
- Rank 0 is an error; any rank >= 1 is valid, also above min(in_features, out_features).
- Negative alpha (a negative scale) is allowed; a non-finite alpha or scale is an error.
- dropout_p must be in [0, 1): 1 is an error, the largest double below 1 works.
- Sizes past 2**31 elements: shapes and index math are int64 (checked here on meta and fake
  tensors; tests/test_cuda.py runs real ones on the GPU).
- Adapter files: non-floating tensors, a truncated file, invalid JSON and impossible r /
  lora_alpha are refused before anything is written; the model is left untouched.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import lora_ext
from lora_ext import ops
from lora_ext.modules import LinearLoRA, patch_linear_module
from lora_ext.reference import lora_linear_reference

Tensor = torch.Tensor
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(M=6, K=7, N=5, r=3, dtype=torch.float32, lora_dtype=None, device="cpu", seed=0):
    """Random (never zero) x, weight, bias, lora_A, lora_B as a dict."""
    gen = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype

    def randn(*shape, dt, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device=device, dtype=dt)

    return dict(
        x=randn(M, K, dt=dtype), weight=randn(N, K, dt=dtype, std=K**-0.5), bias=randn(N, dt=dtype),
        lora_A=randn(r, K, dt=lora_dtype, std=K**-0.5), lora_B=randn(N, r, dt=lora_dtype),
    )


def call(t: dict, scale=0.5, p=0.0, position="post", seed=None, backend="auto"):
    return torch.ops.lora.linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scale, p, position, seed,
                                 backend)


# ---------------------------------------------------------------------------
# NaN / Inf propagate like the reference
# ---------------------------------------------------------------------------

# How the op computes, by the path its C++ kernel takes (csrc/lora_aten.cpp): same dtype
# (the LoRA term fused into the base GEMM), adapters in another dtype, dropout post/pre
# (masking in place), scale 0 (a separate product, since addmm(alpha=0) would skip it),
# and no base weight.
PATHS = {
    "fused": dict(),
    "lora_float16": dict(lora_dtype=torch.float16),
    "post_dropout": dict(p=0.5, position="post"),
    "pre_dropout": dict(p=0.5, position="pre"),
    "scale_zero": dict(scale=0.0),
    "no_weight": dict(weight=False),
}
POISON = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
NON_FINITE_CASES = [
    (where, value, path) for where in NAMES for value in POISON for path in PATHS
    if not (where == "weight" and path == "no_weight")
]


def assert_same_non_finite_pattern(actual: Tensor, expected: Tensor, what: str, rtol: float) -> None:
    """NaN where the reference is NaN, the same +-Inf where it is infinite, close elsewhere."""
    actual = actual.detach().cpu().double()
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().sum()} places, reference at {expected.isnan().sum()}")
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{what}: +inf positions differ"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{what}: -inf positions differ"
    finite = expected.isfinite()
    if finite.any():
        error = (actual[finite] - expected[finite]).abs().max().item()
        bound = rtol * expected[finite].abs().max().item() + 1e-6
        assert error <= bound, f"{what}: finite entries differ by {error:.3g} > {bound:.3g}"


def check_non_finite(where, value, path, device="cpu", backend="auto"):
    options = PATHS[path]
    t = make_inputs(lora_dtype=options.get("lora_dtype"), device=device)
    if options.get("weight") is False:
        t["weight"] = None
    poisoned = t[where].clone()
    # One element, and for x a whole row too: both single and widespread poison.
    poisoned.view(-1)[1] = POISON[value]
    if where == "x":
        poisoned[3] = POISON[value]
    t[where] = poisoned
    for name in NAMES:
        if t[name] is not None:
            t[name].requires_grad_()
    p, position, scale = options.get("p", 0.0), options.get("position", "post"), options.get("scale", 0.5)
    seed = torch.tensor([77], dtype=torch.int64, device=device) if p > 0 else None
    rtol = 1e-2 if options.get("lora_dtype") == torch.float16 else 1e-5

    y, _ = call(t, scale, p, position, seed, backend)
    leaves = {n: v.detach().cpu().double().requires_grad_() for n, v in t.items() if v is not None}
    expected = lora_linear_reference(leaves["x"], leaves.get("weight"), leaves["bias"], leaves["lora_A"],
                                     leaves["lora_B"], scale, p, position, seed)
    assert_same_non_finite_pattern(y, expected, f"{where}={value} ({path}): y", rtol)

    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    present = [n for n in NAMES if t[n] is not None]
    grads = torch.autograd.grad(y, [t[n] for n in present], grad_y.to(device=device, dtype=y.dtype))
    expected_grads = torch.autograd.grad(expected, [leaves[n] for n in present], grad_y)
    for name, grad, expected_grad in zip(present, grads, expected_grads):
        assert_same_non_finite_pattern(grad, expected_grad, f"{where}={value} ({path}): grad {name}", rtol)


@pytest.mark.parametrize("where, value, path", NON_FINITE_CASES)
def test_non_finite_inputs_propagate_like_the_reference(where, value, path):
    check_non_finite(where, value, path)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_nan_in_grad_output_propagates_like_the_reference(position):
    t = make_inputs()
    for v in t.values():
        v.requires_grad_()
    seed = torch.tensor([3], dtype=torch.int64)
    y, _ = call(t, 0.5, 0.5, position, seed)
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    grad_y[2, 1] = math.nan
    leaves = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    expected = lora_linear_reference(*leaves.values(), 0.5, 0.5, position, seed)
    grads = torch.autograd.grad(y, list(t.values()), grad_y.float())
    expected_grads = torch.autograd.grad(expected, list(leaves.values()), grad_y)
    for name, grad, expected_grad in zip(NAMES, grads, expected_grads):
        assert grad.isnan().any(), f"grad {name}: the NaN of grad_y vanished"
        assert_same_non_finite_pattern(grad, expected_grad, f"grad {name}", 1e-5)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("path", list(PATHS))
def test_cuda_non_finite_inputs_propagate_like_the_reference(backend, path):
    from lora_ext.kernels import cuda_dispatch

    if backend == "native" and not cuda_dispatch.native_available():
        pytest.skip("built without the native CUDA kernels")
    for where in NAMES:
        for value in POISON:
            if not (where == "weight" and path == "no_weight"):
                check_non_finite(where, value, path, device="cuda", backend=backend)


# ---------------------------------------------------------------------------
# Dtypes the ops refuse (beyond test_ops.py's int64/complex x and int32 adapters)
# ---------------------------------------------------------------------------

BAD_DTYPES = [
    # (tensors changed, dtype, error type, message)
    (("x",), torch.float8_e4m3fn, TypeError, r"lora: x must be float32, float16, bfloat16 or float64"),
    (("x",), torch.float8_e5m2, TypeError, r"lora: x must be float32"),
    (("x",), torch.bool, TypeError, r"lora: x must be float32"),
    (("x",), torch.uint8, TypeError, r"lora: x must be float32"),
    (("weight",), torch.float8_e4m3fn, TypeError, r"lora: weight must be float32"),
    (("weight",), torch.int8, TypeError, r"lora: weight must be float32"),
    (("bias",), torch.float8_e4m3fn, TypeError, r"lora: bias dtype .* must equal x dtype"),
    (("bias",), torch.int32, TypeError, r"lora: bias dtype .* must equal x dtype"),
    (("lora_A", "lora_B"), torch.float8_e4m3fn, TypeError, r"lora: lora_A must be float32"),
    (("lora_B",), torch.complex64, TypeError, r"lora: lora_B must be float32"),
    (("lora_A",), torch.bool, TypeError, r"lora: lora_A must be float32"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("names, dtype, error, message", BAD_DTYPES,
                         ids=[f"{'+'.join(n)}-{str(d).split('.')[-1]}" for n, d, _, _ in BAD_DTYPES])
def test_unsupported_dtypes_raise_naming_the_argument(names, dtype, error, message, device):
    t = make_inputs(device=device)
    for name in names:
        t[name] = torch.ones(t[name].shape, device=device).to(dtype)
    with pytest.raises(error, match=message):
        call(t)


# ---------------------------------------------------------------------------
# 0-dim tensors, rank 0 and ranks above min(K, N)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name, message", [
    ("lora_A", r"lora: lora_A must be 2-D \(r, in_features\)"),
    ("lora_B", r"lora: lora_B must be 2-D \(out_features, r\)"),
    ("weight", r"lora: weight must be 2-D \(out_features, in_features\)"),
    ("bias", r"lora: bias must have shape \(out_features=5,\)"),
])
def test_0dim_parameters_raise_naming_the_argument(name, message, device):
    t = make_inputs(device=device)
    t[name] = torch.tensor(1.0, device=device)
    with pytest.raises(RuntimeError, match=message):
        call(t)


def test_0dim_seed_is_the_same_seed_as_a_one_element_seed():
    t = make_inputs()
    y0, _ = call(t, p=0.5, seed=torch.tensor(123456789, dtype=torch.int64))
    y1, _ = call(t, p=0.5, seed=torch.tensor([123456789], dtype=torch.int64))
    assert torch.equal(y0, y1)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_0dim_grad_output_and_xa_raise(device):
    t = make_inputs(device=device)
    y, xa = call(t)
    mask = [True, True, False, True, True]
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"])
    with pytest.raises(RuntimeError, match=r"lora: grad_y must have shape \(\.\.\., 5\) with 6 rows"):
        torch.ops.lora.linear_backward(torch.tensor(1.0, device=device), *args, xa, 0.5, 0.0, "post", None, mask)
    with pytest.raises(RuntimeError, match=r"lora: xa must have shape \(6, 3\)"):
        torch.ops.lora.linear_backward(torch.ones_like(y), *args, torch.tensor(1.0, device=device), 0.5, 0.0,
                                       "post", None, mask)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_rank_0_raises_in_forward_and_backward(device):
    t = make_inputs(device=device)
    t["lora_A"] = torch.ones(0, 7, device=device)
    t["lora_B"] = torch.ones(5, 0, device=device)
    with pytest.raises(RuntimeError, match=r"lora: rank must be >= 1, got lora_A of shape \[?\(?0, 7"):
        call(t)
    with pytest.raises(RuntimeError, match=r"lora: rank must be >= 1"):
        torch.ops.lora.linear_backward(torch.ones(6, 5, device=device), t["x"], t["weight"], t["lora_A"],
                                       t["lora_B"], torch.ones(6, 0, device=device), 0.5, 0.0, "post", None,
                                       [True] * 5)


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("K, N, r", [(3, 2, 16), (1, 1, 7), (5, 40, 64), (40, 5, 256)])
def test_rank_above_in_and_out_features_is_valid_and_exact(K, N, r, position):
    # Allowed: the product A^T B^T then has rank min(K, N, r), which is only wasteful.
    t = make_inputs(M=4, K=K, N=N, r=r)
    for v in t.values():
        v.requires_grad_()
    seed = torch.tensor([9], dtype=torch.int64)
    y, xa = call(t, 0.5, 0.25, position, seed)
    assert xa.shape == (4, r)
    leaves = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    expected = lora_linear_reference(*leaves.values(), 0.5, 0.25, position, seed)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.sum(), list(t.values()))
    expected_grads = torch.autograd.grad(expected.sum(), list(leaves.values()))
    for name, grad, expected_grad in zip(NAMES, grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


def test_module_with_dim_above_its_features():
    base = nn.Linear(3, 2)
    layer = LinearLoRA(base, dim=16, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 3)
    expected = lora_linear_reference(x.double(), base.weight.double(), base.bias.double(),
                                     layer.lora_A.weight.double(), layer.lora_B.weight.double(), 0.5)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# dropout_p and scale (alpha) at their limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["pre", "post"])
def test_largest_p_below_one_works_and_matches_the_reference(position):
    # p = 1 - 2**-53: threshold 2**16 - 1, so an element is kept with probability 2**-16 and
    # scaled by 1 / (1 - p) = 2**53 if it is: finite, and almost certainly all dropped here.
    p = math.nextafter(1.0, 0.0)
    t = make_inputs(M=64, K=33, N=17)
    seed = torch.tensor([2024], dtype=torch.int64)
    y, _ = call(t, 0.5, p, position, seed)
    expected = lora_linear_reference(*(v.double() for v in t.values()), 0.5, p, position, seed)
    assert y.isfinite().all()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.5, 0.7])
@pytest.mark.parametrize("position", ["pre", "post"])
def test_tiny_p_drops_nothing_and_equals_no_dropout(position, scale, dtype):
    """floor(5e-324 * 2**16) = 0: no element is dropped and 1 / (1 - p) rounds to 1 (README, Sizes, rank and
    values). 'pre' gives the dropout-free bits; 'post' applies the scale after its mask, so the LoRA term is
    rounded in another order: bit for bit where that cannot matter (a power-of-two scale in float32), within
    a rounding of the output elsewhere."""
    t = make_inputs(M=33, K=20, N=17, r=5, dtype=dtype)
    y_tiny, _ = call(t, scale, 5e-324, position, torch.tensor([1], dtype=torch.int64))
    y_none, _ = call(t, scale)
    if position == "pre" or (scale == 0.5 and dtype == torch.float32):
        assert torch.equal(y_tiny, y_none)
    else:
        ulp = torch.finfo(dtype).eps * y_none.float().abs().clamp(min=1.0)
        assert ((y_tiny.float() - y_none.float()).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("p", [1.0, math.inf, -math.inf, 1.0000001])
def test_p_of_one_or_more_raises(p, device):
    t = make_inputs(device=device)
    with pytest.raises(ValueError, match=r"lora: dropout_p must be in \[0, 1\)"):
        call(t, 0.5, p, "post", torch.tensor([1], dtype=torch.int64, device=device))


def test_module_dropout_set_to_one_after_construction_raises_in_training():
    layer = LinearLoRA(nn.Linear(4, 3), dim=2, dropout=0.1).train()
    layer.dropout_p = 1.0
    with pytest.raises(ValueError, match=r"lora: dropout_p must be in \[0, 1\), got 1"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_raises_in_forward_and_backward(scale, device):
    t = make_inputs(device=device)
    with pytest.raises(ValueError, match=r"lora: scale must be a finite number"):
        call(t, scale)
    y, xa = call(t)
    with pytest.raises(ValueError, match=r"lora: scale must be a finite number"):
        torch.ops.lora.linear_backward(torch.ones_like(y), t["x"], t["weight"], t["lora_A"], t["lora_B"], xa, scale,
                                       0.0, "post", None, [True, True, False, True, True])


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype,lora_dtype,scale", [(torch.float16, torch.float16, 1e5), (torch.float32, torch.float16, -7e4),
                                                    (torch.float16, torch.float32, 7e4),
                                                    (torch.float32, torch.float32, 1e39)], ids=str)
def test_scale_past_the_dtype_range_raises(dtype, lora_dtype, scale, device):
    """A finite scale that x's or the adapters' dtype cannot hold: some paths apply it in that dtype,
    where it would become inf (outputs inf, NaN or right depending on the path): refused, naming scale."""
    gen = torch.Generator().manual_seed(3)
    x, w = (torch.randn(*shape, generator=gen).to(device=device, dtype=dtype) for shape in ((3, 8), (4, 8)))
    A = torch.randn(2, 8, generator=gen).to(device=device, dtype=lora_dtype)
    with pytest.raises(ValueError, match=r"lora: scale .* is beyond the range of"):
        torch.ops.lora.linear(x, w, None, A, torch.zeros(4, 2, device=device, dtype=lora_dtype), scale, 0.0, "post",
                              None)
    if device == "meta":
        return
    # The largest value is accepted, and computed right: B ~ 10 / scale (normal numbers in its dtype),
    # so that the LoRA term is ~10 and y in range, while s xa alone would not be.
    limit = 65504.0 if torch.float16 in (dtype, lora_dtype) else 3e38
    B = (torch.randn(4, 2, generator=gen, dtype=torch.float64) * 10 / limit).to(dtype=lora_dtype)
    y, _ = torch.ops.lora.linear(x, w, None, A, B, limit, 0.0, "post", None)
    ref = lora_linear_reference(x, w, None, A, B, limit, compute_dtype=torch.float64)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("alpha", [-16, -0.5])
def test_negative_alpha_is_allowed_and_flips_the_adapter(alpha):
    # A negative alpha is unusual but meaningful (scale = alpha / dim < 0); it is not refused.
    assert lora_ext.PeftConfig(alpha=alpha).alpha == alpha
    base = nn.Linear(6, 4)
    layer = LinearLoRA(base, dim=2, alpha=alpha)
    assert layer.scale == alpha / 2
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6, requires_grad=True)
    y = layer(x)
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    expected = lora_linear_reference(leaves[0], base.weight.double(), base.bias.double(), leaves[1], leaves[2],
                                     alpha / 2)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.sum(), [x, layer.lora_A.weight, layer.lora_B.weight])
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("make", ["PeftConfig", "LinearLoRA", "patch"])
def test_non_finite_alpha_raises_and_leaves_the_module_unchanged(alpha, make):
    linear = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"alpha must be a finite real number"):
        if make == "PeftConfig":
            lora_ext.PeftConfig(alpha=alpha)
        elif make == "LinearLoRA":
            LinearLoRA(linear, alpha=alpha)
        else:
            patch_linear_module(linear, alpha=alpha)
    assert type(linear) is nn.Linear and not hasattr(linear, "lora_A")


def test_module_scale_set_to_inf_after_construction_raises():
    layer = LinearLoRA(nn.Linear(4, 3), dim=2)
    layer.scale = math.inf
    with pytest.raises(ValueError, match=r"lora: scale must be a finite number, got inf"):
        layer(torch.randn(2, 4))


# ---------------------------------------------------------------------------
# lora::linear_backward's own arguments, meta and real tensors mixed
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case, error, message", [
    ("grad_y_dtype", TypeError, r"lora: grad_y dtype \((Double|torch\.float64)\) must equal x dtype"),
    ("xa_dtype", TypeError, r"lora: xa dtype \((Half|torch\.float16)\) must equal lora_A dtype"),
    ("grad_y_device", RuntimeError, r"lora: grad_y is on .* but x is on"),
    ("xa_device", RuntimeError, r"lora: xa is on .* but x is on"),
])
def test_backward_arguments_raise_naming_the_argument(case, error, message, device):
    t = make_inputs(device=device)
    y, xa = call(t)
    grad_y = torch.ones_like(y)
    other = "meta" if device == "cpu" else "cpu"
    if case == "grad_y_dtype":
        grad_y = grad_y.double()
    elif case == "xa_dtype":
        xa = xa.half()
    elif case == "grad_y_device":
        grad_y = torch.ones(y.shape, device=other)
    else:
        xa = torch.ones(xa.shape, device=other)
    with pytest.raises(error, match=message):
        torch.ops.lora.linear_backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], xa, 0.5, 0.0, "post",
                                       None, [True, True, True, True, True])


BACKWARD_AND_SCALE_CASES = [
    ("scale_inf", ValueError, r"lora: scale must be a finite number"),
    ("grad_y_dtype", TypeError, r"lora: grad_y dtype \((Double|torch\.float64)\) must equal x dtype"),
    ("xa_dtype", TypeError, r"lora: xa dtype \((Half|torch\.float16)\) must equal lora_A dtype"),
    ("grad_y_0dim", RuntimeError, r"lora: grad_y must have shape"),
]


def _check_backward_and_scale_case(case, error, message, forward, backward, device):
    t = make_inputs(device=device)
    y, xa = call(t)  # valid outputs; only the hostile calls go through forward/backward
    grad_y, scale = torch.ones_like(y), 0.5
    if case == "scale_inf":
        with pytest.raises(error, match=message):
            forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], math.inf)
        scale = math.inf
    elif case == "grad_y_dtype":
        grad_y = grad_y.double()
    elif case == "xa_dtype":
        xa = xa.half()
    else:
        grad_y = torch.tensor(1.0, device=device)
    with pytest.raises(error, match=message):
        backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], xa, scale, 0.0, "post", None,
                 [True, True, True, True, True])


@pytest.mark.parametrize("case, error, message", BACKWARD_AND_SCALE_CASES)
def test_triton_launchers_check_arguments_like_the_cpu_kernel(case, error, message):
    # The checks run before any launch, so CPU tensors reach them without a GPU or the interpreter.
    pytest.importorskip("triton")
    from lora_ext.kernels import triton_lora

    _check_backward_and_scale_case(case, error, message, triton_lora.linear_forward, triton_lora.linear_backward,
                                   "cpu")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("case, error, message", BACKWARD_AND_SCALE_CASES)
def test_cuda_backends_check_arguments_like_the_cpu_kernel(case, error, message, backend):
    from lora_ext.kernels import cuda_dispatch

    if backend == "native" and not cuda_dispatch.native_available():
        pytest.skip("built without the native CUDA kernels")

    def forward(*args):
        return torch.ops.lora.linear(*args, 0.0, "post", None, backend)

    def backward(*args):
        return torch.ops.lora.linear_backward(*args, backend)

    _check_backward_and_scale_case(case, error, message, forward, backward, "cuda")


def test_module_on_cpu_with_meta_input_raises_naming_the_tensor():
    layer = LinearLoRA(nn.Linear(4, 3), dim=2)
    with pytest.raises(RuntimeError, match=r"lora: \w+ is on cpu but x is on meta"):
        layer(torch.randn(2, 4, device="meta"))


def test_module_input_of_another_dtype_or_size_raises():
    layer = LinearLoRA(nn.Linear(4, 3), dim=2)
    with pytest.raises(TypeError, match=r"lora: weight dtype .* must equal x dtype"):
        layer(torch.randn(2, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"must equal x.shape\[-1\]"):
        layer(torch.randn(2, 5))


# ---------------------------------------------------------------------------
# Sizes past 2**31 elements: no int32 anywhere in shapes or checks (meta and fake tensors)
# ---------------------------------------------------------------------------

LARGE = [
    ((2**17 + 3, 2**16 + 1), 2**15 + 7, 16),  # 2-D x, y > 2**32 elements, weight > 2**31
    ((2**11, 2**10 + 1, 2**12), 2**16 + 3, 8),  # 3-D x with > 2**33 elements
    ((2**31 + 11, 3), 3, 1),  # M itself past int32
    ((5, 2**31 + 7), 3, 2),  # K itself past int32
]


@pytest.mark.parametrize("x_shape, N, r", LARGE)
def test_meta_shapes_past_int32_forward_and_backward(x_shape, N, r):
    K = x_shape[-1]
    M = math.prod(x_shape[:-1])
    x = torch.empty(x_shape, device="meta", requires_grad=True)
    weight = torch.empty(N, K, device="meta", requires_grad=True)
    bias = torch.empty(N, device="meta", requires_grad=True)
    lora_A = torch.empty(r, K, device="meta", requires_grad=True)
    lora_B = torch.empty(N, r, device="meta", requires_grad=True)
    seed = torch.tensor([1], dtype=torch.int64, device="meta")
    y, xa = torch.ops.lora.linear(x, weight, bias, lora_A, lora_B, 0.5, 0.1, "pre", seed)
    assert max(x.numel(), y.numel()) > 2**31
    assert y.shape == (*x_shape[:-1], N) and y.numel() == M * N
    assert xa.shape == (M, r)
    grads = torch.autograd.grad(y, [x, weight, bias, lora_A, lora_B], torch.empty_like(y))
    assert [tuple(g.shape) for g in grads] == [x_shape, (N, K), (N,), (r, K), (N, r)]
    # The backward op's own check multiplies M * N; it must not wrap.
    grads = torch.ops.lora.linear_backward(torch.empty_like(y), x, weight, lora_A, lora_B, xa, 0.5, 0.1, "pre",
                                           seed, [True, False, False, True, True])
    assert tuple(grads[0].shape) == x_shape and tuple(grads[3].shape) == (r, K)


def test_fake_tensor_mode_shapes_past_int32():
    # Fake tensors of device cpu (what torch.compile traces with): the fake kernel answers, the
    # C++ kernel never runs, and nothing of this size is allocated.
    from torch._subclasses.fake_tensor import FakeTensorMode

    M, K, N, r = 3 * 2**30 + 1, 2, 3, 4
    with FakeTensorMode():
        x = torch.empty(M, K, dtype=torch.bfloat16)
        weight = torch.empty(N, K, dtype=torch.bfloat16)
        lora_A = torch.empty(r, K)
        lora_B = torch.empty(N, r)
        y, xa = torch.ops.lora.linear(x, weight, None, lora_A, lora_B, 2.0)
        assert y.shape == (M, N) and y.dtype == torch.bfloat16 and y.device.type == "cpu"
        assert xa.shape == (M, r) and xa.dtype == torch.float32
        assert y.numel() == M * N > 2**33


# ---------------------------------------------------------------------------
# PeftConfig values beyond tests/test_config.py
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, argument", [
    ({"alpha": True}, "alpha"),
    ({"alpha": None}, "alpha"),
    ({"dropout": math.nan}, "dropout"),
    ({"dropout": math.inf}, "dropout"),
    ({"dropout": True}, "dropout"),
    ({"dim": True}, "dim"),
    ({"dim": 8.0}, "dim"),
    ({"dim": "8"}, "dim"),
    ({"lora_dtype": torch.float8_e4m3fn}, "lora_dtype"),
    ({"lora_dtype": torch.complex64}, "lora_dtype"),
    ({"lora_dtype": "fp8"}, "lora_dtype"),
    ({"dropout_position": None}, "dropout_position"),
    ({"use_triton": "yes"}, "use_triton"),
    ({"exclude_modules": [None]}, "exclude_modules"),
])
def test_hostile_peft_config_values_raise_naming_the_field(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        lora_ext.PeftConfig(**kwargs)


def test_config_made_hostile_after_construction_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    config = lora_ext.PeftConfig(match_all_linear=True)
    config.alpha = math.inf
    with pytest.raises(ValueError, match="alpha"):
        lora_ext.apply_lora_to_linear_modules(model, config)
    assert all(type(m) is nn.Linear for m in model) and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------
# Adapter files (beyond tests/test_adapters.py): refused before anything is written
# ---------------------------------------------------------------------------


def _lora_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    lora_ext.apply_lora_to_linear_modules(model, lora_ext.PeftConfig(match_all_linear=True, dim=2, alpha=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


@pytest.fixture
def saved_adapter(tmp_path):
    lora_ext.save_adapter(_lora_model(seed=1), tmp_path)
    return tmp_path


def _assert_load_fails_and_model_unchanged(directory, error, message):
    model = _lora_model(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        lora_ext.load_adapter(model, directory)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_adapter_with_non_floating_tensors_is_refused(saved_adapter, dtype):
    from safetensors.torch import load_file, save_file

    path = saved_adapter / lora_ext.adapters.ADAPTER_WEIGHTS_NAME
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].to(dtype)
    save_file(tensors, path)
    _assert_load_fails_and_model_unchanged(
        saved_adapter, lora_ext.adapters.AdapterMismatchError, rf"not floating point .*\n\s+{first}")


def test_adapter_in_float8_or_float64_loads_cast_to_the_layer_dtype(saved_adapter):
    # Floating formats are all accepted: the values are cast (exactly, for these) to the layer's dtype.
    from safetensors.torch import load_file, save_file

    path = saved_adapter / lora_ext.adapters.ADAPTER_WEIGHTS_NAME
    tensors = load_file(path)
    exact = {k: v.to(torch.float8_e4m3fn) if i % 2 else v.double() for i, (k, v) in enumerate(sorted(tensors.items()))}
    save_file(exact, path)
    model = _lora_model(seed=2)
    lora_ext.load_adapter(model, saved_adapter)
    state = model.state_dict()
    for key, value in exact.items():
        assert torch.equal(state[key.removeprefix("base_model.model.")], value.float())


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_adapter_file_is_refused(saved_adapter, keep):
    path = saved_adapter / lora_ext.adapters.ADAPTER_WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _assert_load_fails_and_model_unchanged(saved_adapter, ValueError, r"not a valid safetensors file")


@pytest.mark.parametrize("change, message", [
    ({"r": 0}, r"r must be an integer >= 1, got 0"),
    ({"r": "two"}, r"r must be an integer >= 1, got 'two'"),
    ({"r": None}, r"r must be an integer >= 1, got None"),
    ({"lora_alpha": math.nan}, r"lora_alpha must be a finite number, got nan"),
    ({"lora_alpha": "4"}, r"lora_alpha must be a finite number, got '4'"),
    ({"rank_pattern": {"0": -2}}, r"rank_pattern\['0'\] must be an integer >= 1"),
    ({"alpha_pattern": {"2": math.inf}}, r"alpha_pattern\['2'\] must be a finite number"),
])
def test_adapter_config_with_impossible_rank_or_alpha_is_refused(saved_adapter, change, message):
    path = saved_adapter / lora_ext.adapters.ADAPTER_CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config))
    _assert_load_fails_and_model_unchanged(saved_adapter, ValueError, message)
    with pytest.raises(ValueError, match=message):
        lora_ext.read_adapter_config(saved_adapter)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_adapter_config_that_is_not_a_json_object_is_refused(saved_adapter, text):
    (saved_adapter / lora_ext.adapters.ADAPTER_CONFIG_NAME).write_text(text)
    _assert_load_fails_and_model_unchanged(saved_adapter, ValueError, r"adapter_config.json: (not valid JSON|expected a JSON object)")


def test_adapter_file_with_renamed_keys_lists_missing_and_unexpected(saved_adapter):
    # Keys saved without peft's "base_model.model." prefix: every key is both missing and unexpected.
    from safetensors.torch import load_file, save_file

    path = saved_adapter / lora_ext.adapters.ADAPTER_WEIGHTS_NAME
    tensors = load_file(path)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, path)
    _assert_load_fails_and_model_unchanged(
        saved_adapter, lora_ext.adapters.AdapterMismatchError, r"(?s)missing from the file .*\(4\).*unexpected in the file .*\(4\)")
