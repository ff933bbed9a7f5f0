"""FSDP2 (fully_shard) training of LoRA layers: 2 CPU processes with gloo vs one process.

The work happens in tests/fsdp_worker.py (spawned in a fresh interpreter, so this test
process never initialises torch.distributed). The sharded model goes through the meta
flow (meta build, LoRA, fully_shard, lora_ext.materialize) and each rank trains on half of
the global batch; the per-step loss, every adapter gradient, the trained adapters, the
adapter file saved from the sharded model and the adapters loaded back into a sharded
model must all equal single-process training on the full batch.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_path, *extra_args, **extra_env):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra_env)
    # free_port() releases the port before the workers bind it: another process may take it in
    # between. Only that failure is retried (with a new port).
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, WORKER, "--world-size", "2", "--port", str(free_port()), "--out", str(out), *extra_args],
            capture_output=True, text=True, timeout=240, env=env,
        )
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


def check_result(result):
    assert result["world_size"] == 2
    # fp32, same math; only the order of the cross-rank gradient sum differs.
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(result["ref_losses"]), rtol=1e-6, atol=1e-6)
    assert result["n_grads"] == 4 * 14  # 4 steps x (7 LoRA layers x 2 adapters)
    assert result["grad_diff"] <= 1e-6
    assert result["param_diff"] <= 1e-5  # after 4 AdamW steps (lr 1e-2)
    assert result["frozen_same"], "the frozen base weights must not change"
    assert result["n_saved"] == 14
    assert result["saved_diff"] <= 1e-5
    assert result["load_diff"] == 0.0
    assert result["reload_diff"] == 0.0  # loaded after an eval forward (root unit unsharded)
    assert result["merge_refused"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp2_two_processes_match_single_process(tmp_path):
    check_result(run_worker(tmp_path))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_fsdp2_two_gpus_nccl_match_single_process(tmp_path):
    # The lent machines do not support NVLink multicast: switch it off before NCCL starts.
    result = run_worker(
        tmp_path, "--backend", "nccl", "--device", "cuda", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1"
    )
    check_result(result)
