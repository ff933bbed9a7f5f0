"""Determinism of the lora ops: same inputs and seed -> bitwise equal outputs and gradients.

Under torch.use_deterministic_algorithms(True):
- CPU: forward and backward, with dropout 'pre' / 'post' and without, every dtype pairing and
  shapes large enough for the parallel dropout loop and multi-threaded GEMMs, give bitwise
  equal y, xa and gradients when run twice; torch.manual_seed reproduces the seeds drawn by
  ops.linear and by LinearLoRA in training mode.
- Across processes: two fresh Python processes compute the same digest of every output.
- CUDA (marked cuda): the same, for the Triton and the native backends, in a child process
  with CUBLAS_WORKSPACE_CONFIG=:4096:8 (what deterministic cuBLAS needs, set before CUDA
  starts); the shapes take the kernels' split paths (float32 partials summed in a fixed order).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lora_ext
from lora_ext import ops

NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
TESTS_DIR = pathlib.Path(__file__).parent

# (M, K, N, r, dtype, lora dtype, dropout p, position)
CPU_CASES = [
    (33, 17, 40, 8, torch.float32, torch.float32, 0.0, "post"),
    (4096, 64, 96, 16, torch.float32, torch.float32, 0.3, "post"),  # M*N > the dropout loop's 16384 grain
    (4096, 96, 64, 16, torch.float32, torch.float32, 0.3, "pre"),
    (1024, 64, 48, 4, torch.bfloat16, torch.bfloat16, 0.5, "post"),
    (1024, 48, 64, 4, torch.float16, torch.float32, 0.5, "pre"),
    (0, 17, 5, 3, torch.float32, torch.float32, 0.5, "pre"),
]
CUDA_CASES = [
    (8192, 1024, 1024, 16, torch.bfloat16, torch.bfloat16, 0.1, "post"),
    (8192, 1024, 1024, 64, torch.bfloat16, torch.bfloat16, 0.1, "pre"),
    (4099, 513, 257, 8, torch.float16, torch.float32, 0.0, "post"),
    (2048, 4096, 1024, 256, torch.float32, torch.float32, 0.2, "pre"),
    (8192, 1024, 1032, 16, torch.bfloat16, torch.bfloat16, 0.0, "post"),  # the dropout-free k/v path
]


@contextlib.contextmanager
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def run_once(case, device="cpu", backend="auto", manual_seed=1234) -> dict:
    """y, xa and every gradient of one forward + backward; the dropout seed drawn after manual_seed."""
    M, K, N, r, dtype, lora_dtype, p, position = case
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dt, std=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device=device, dtype=dt)
        return t.requires_grad_()

    tensors = dict(
        x=randn(M, K, dt=dtype), weight=randn(N, K, dt=dtype, std=K**-0.5), bias=randn(N, dt=dtype),
        lora_A=randn(r, K, dt=lora_dtype, std=K**-0.5), lora_B=randn(N, r, dt=lora_dtype, std=r**-0.5),
    )
    torch.manual_seed(manual_seed)
    seed = ops.draw_seed(torch.device(device)) if p > 0 else None
    y, xa = torch.ops.lora.linear(*tensors.values(), 0.75, p, position, seed, backend)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, list(tensors.values()), grad_y)
    out = {"y": y.detach(), "xa": xa.detach()}
    out.update({f"grad_{name}": g for name, g in zip(NAMES, grads)})
    return out


def assert_bitwise_equal(first: dict, second: dict, what) -> None:
    for name in first:
        a, b = first[name], second[name]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} {name}"
        # Compare the bits: torch.equal would call NaN != NaN and -0.0 == 0.0.
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), (
            f"{what}: {name} differs between two identical runs")


def digest(outputs: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(outputs):
        h.update(name.encode())
        h.update(outputs[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"M{c[0]}K{c[1]}N{c[2]}r{c[3]}-{c[4]}-{c[5]}-p{c[6]}-{c[7]}")
def test_cpu_forward_and_backward_are_bitwise_reproducible(case):
    with deterministic_algorithms():
        first = run_once(case)
        second = run_once(case)
    assert_bitwise_equal(first, second, case)
    if case[6] > 0 and case[0] > 0:
        # The seed matters: another manual_seed draws another seed and another mask.
        with deterministic_algorithms():
            other = run_once(case, manual_seed=4321)
        assert not torch.equal(first["y"], other["y"])


@pytest.mark.parametrize("position", ["pre", "post"])
def test_module_training_steps_are_reproducible_from_manual_seed(position):
    def train(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
        lora_ext.apply_lora_to_linear_modules(
            model, lora_ext.PeftConfig(match_all_linear=True, dim=4, alpha=8, dropout=0.3, dropout_position=position))
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(seed)
        data = torch.randn(3, 64, 32)
        losses = []
        for batch in data:
            loss = model(batch).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}

    with deterministic_algorithms():
        losses_a, state_a = train(7)
        losses_b, state_b = train(7)
        losses_c, _ = train(8)
    assert_bitwise_equal({"losses": losses_a, **state_a}, {"losses": losses_b, **state_b}, position)
    assert not torch.equal(losses_a, losses_c)


def _child_digests(device: str, backend: str, cases: list, extra_env: dict | None = None) -> dict:
    """Digests of run_once for each case, computed in a fresh Python process."""
    payload = json.dumps({"device": device, "backend": backend,
                          "cases": [[*c[:4], str(c[4]), str(c[5]), *c[6:]] for c in cases]})
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import test_determinism as t; "
        "print(json.dumps(t.child_main(json.loads(sys.argv[2]))))"
    )
    env = dict(os.environ, **(extra_env or {}))
    result = subprocess.run([sys.executable, "-c", script, str(TESTS_DIR), payload], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_main(request: dict) -> dict:
    """Child-process side of _child_digests: two runs in here must agree too."""
    torch.set_num_threads(2)
    device, backend = request["device"], request["backend"]
    digests = {}
    with deterministic_algorithms():
        for raw in request["cases"]:
            case = (*raw[:4], getattr(torch, raw[4].split(".")[-1]), getattr(torch, raw[5].split(".")[-1]), *raw[6:])
            first, second = run_once(case, device, backend), run_once(case, device, backend)
            assert_bitwise_equal(first, second, case)
            digests[repr(raw)] = digest(first)
    return digests


def test_two_processes_compute_bitwise_equal_results():
    cases = [CPU_CASES[1], CPU_CASES[4]]
    assert _child_digests("cpu", "auto", cases) == _child_digests("cpu", "auto", cases)


# ---------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "native", "native-switches-off", "native-cp-async"])
def test_cuda_backends_are_bitwise_reproducible_under_deterministic_algorithms(backend):
    from lora_ext.kernels import cuda_dispatch

    if backend.startswith("native") and not cuda_dispatch.native_available():
        pytest.skip("built without the native CUDA kernels")
    # Deterministic cuBLAS needs this before CUDA starts, hence the child processes; the
    # child also checks two runs in one process. native-switches-off: the native path with the
    # one-launch adapter gradients and the 'post' fused GEMMs off (on by default; the env vars are
    # read at import), i.e. the cuBLAS compositions they replace; native-cp-async: the masked step's
    # cp.async loads on (off by default, measured slower: LORA_EXT_MASKED_GRAD_Y_STAGES).
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if backend == "native-switches-off":
        backend, env = "native", {**env, "LORA_EXT_FUSED_ADAPTER_GRADS": "0", "LORA_EXT_FUSED_POST_DROPOUT": "0"}
    elif backend == "native-cp-async":
        backend, env = "native", {**env, "LORA_EXT_MASKED_GRAD_Y_STAGES": "3"}
    first = _child_digests("cuda", backend, CUDA_CASES, env)
    second = _child_digests("cuda", backend, CUDA_CASES, env)
    assert first == second
