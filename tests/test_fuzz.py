"""Property-based tests (hypothesis) of torch.ops.lora.linear and its gradients (lora::linear_backward).

Each example is a random problem (tests/_fuzz_problems.py): sizes 0, 1, primes and sizes around
the block sizes, ranks 1..256 (also above min(K, N)), float32/float16/bfloat16 with the
adapters in the same or another dtype, transposed / sliced / expanded (stride 0) tensors,
bias or not, weight or not, dropout p in [0, 0.95] 'pre' or 'post' with any int64 seed, any
subset of tensors requiring grad. y, xa and every requested gradient are compared elementwise
with the float64 reference (lora_ext.reference) within a bound scaled by the dtype's unit
roundoff and the magnitude of the terms summed (see _fuzz_problems.assert_within_bound).

- CPU: the C++ kernels; the same problem on the meta device must give the same shapes/dtypes.
- Triton: the same problems (float32/float16, small) under TRITON_INTERPRET=1 in a child
  process (tests/_triton_interpret_fuzz.py).
- CUDA (marked cuda): every backend, larger sizes and more examples.

LORA_FUZZ_EXAMPLES multiplies the number of examples (e.g. 20 on the GPU machine).
"""
from __future__ import annotations

import pathlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import lora_ext  # noqa: F401  (registers torch.ops.lora.*)
from _fuzz_problems import (
    DERANDOMIZE, SIZES, TENSOR_NAMES, Problem, assert_within_bound, fuzz_examples, intermediate_underflow_floors,
    problems, reference_outputs,
)

HYPOTHESIS_SETTINGS = dict(
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)

# Sizes of the CUDA run: also past the GPU kernels' largest blocks and a few thousand wide.
CUDA_SIZES = SIZES + (255, 256, 257, 1000, 1031, 4096, 4099)


def check_against_reference(problem: Problem, device: str, backend: str = "auto", extra_roundings: int = 0) -> None:
    """Runs lora::linear (and autograd through it) on `device` and checks it against the reference."""
    t = problem.build(device)
    y, xa = torch.ops.lora.linear(*problem.op_args(t, backend))
    M, N, r = problem.M, problem.N, problem.r
    assert y.shape == (*problem.leading, N) and y.dtype == problem.dtype and y.device == t["x"].device
    assert xa.shape == (M, r) and xa.dtype == problem.lora_dtype
    gen = torch.Generator().manual_seed(problem.data_seed + 1)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=y.dtype)

    expected_y, expected_xa, expected_grads = reference_outputs(problem, t, grad_y, absolute=False)
    magnitude_y, magnitude_xa, magnitude_grads = reference_outputs(problem, t, grad_y, absolute=True)
    # Longest dot product or sum behind any output: over K (y), r (y, dx), M (dW, db, dA, dB), N (dx).
    length = problem.K + problem.N + problem.M + r
    floors = intermediate_underflow_floors(problem, t, grad_y)
    assert_within_bound(y, expected_y, magnitude_y, problem, length, "y", extra_roundings, floors.get("y"))
    assert_within_bound(xa, expected_xa, magnitude_xa, problem, length, "xa", extra_roundings)

    wanted = [name for name in TENSOR_NAMES if t[name] is not None and t[name].requires_grad]
    assert y.requires_grad == bool(wanted)
    if not wanted:
        return
    grads = torch.autograd.grad(y, [t[name] for name in wanted], grad_y)
    for name, grad in zip(wanted, grads):
        assert grad.dtype == t[name].dtype, f"grad {name}: dtype {grad.dtype}, input {t[name].dtype}"
        assert_within_bound(grad, expected_grads[name], magnitude_grads[name], problem, length, f"grad {name}",
                            extra_roundings, floors.get(name))


@given(problem=problems())
@settings(max_examples=fuzz_examples(600), **HYPOTHESIS_SETTINGS)
def test_cpu_forward_and_gradients_match_reference(problem):
    check_against_reference(problem, "cpu")


@given(problem=problems(budget=4_000))
@settings(max_examples=fuzz_examples(100), **HYPOTHESIS_SETTINGS)
def test_meta_outputs_match_cpu_outputs(problem):
    # The fake kernels must describe exactly what the CPU kernels return: shape, dtype and
    # strides of y and xa, shape and dtype of every gradient.
    results = {}
    for device in ("cpu", "meta"):
        t = problem.build(device)
        y, xa = torch.ops.lora.linear(*problem.op_args(t))
        wanted = [name for name in TENSOR_NAMES if t[name] is not None and t[name].requires_grad]
        grads = torch.autograd.grad(y, [t[n] for n in wanted], torch.ones_like(y)) if wanted else ()
        results[device] = [(o.shape, o.dtype, o.stride()) for o in (y, xa)] + [(g.shape, g.dtype) for g in grads]
    assert results["cpu"] == results["meta"]


def test_triton_kernels_fuzz_under_the_interpreter():
    # TRITON_INTERPRET must be set before triton is imported: as tests/test_triton_interpret.py
    # does for its cases, the fuzz file runs in a child pytest process.
    from test_triton_interpret import run_under_interpreter  # tests/ is on sys.path under pytest

    run_under_interpreter(pathlib.Path(__file__).with_name("_triton_interpret_fuzz.py"), "interpreter fuzz",
                          timeout=900)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton", "native"])
def test_cuda_forward_and_gradients_match_reference(backend):
    from lora_ext.kernels import cuda_dispatch

    if backend == "native" and not cuda_dispatch.native_available():
        pytest.skip("lora_ext was built without the native CUDA kernels")
    if backend == "triton" and not cuda_dispatch.triton_available():
        pytest.skip("triton is not installed")

    @given(problem=problems(budget=2_000_000, sizes=CUDA_SIZES))
    @settings(max_examples=fuzz_examples(100), **HYPOTHESIS_SETTINGS)
    def run(problem):
        # Two more roundings: cuBLAS may reduce float16/bfloat16 split-K partials in 16 bits
        # (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction, on by default).
        check_against_reference(problem, "cuda", backend, extra_roundings=2)

    run()
