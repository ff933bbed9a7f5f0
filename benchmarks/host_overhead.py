"""Host (CPU) time per call of one LoRA linear layer: the Python/dispatcher cost that
eager decode and small layers pay whatever the kernels do.

A tiny layer (K = N = 64, M = 4) keeps the device work negligible, so the per-call
wall time of a long loop is the host's launch path. Printed per provider, in µs.

    python benchmarks/host_overhead.py [--device cuda]
"""
from __future__ import annotations

import argparse

import torch

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402


def per_call_us(fn, device, calls=2000) -> float:
    return common.wall_us_per_call(fn, calls, device, warmup=200)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    K = N = 64
    base = torch.nn.Linear(K, N, bias=False, device=device).requires_grad_(False)
    layer = lora_ext.LinearLoRA(torch.nn.Linear(K, N, bias=False, device=device), dim=8)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(4, K, device=device, requires_grad=True)
    g = torch.randn(4, N, device=device)

    def peft_like():
        return base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * layer.scale

    rows = []
    for name, fwd, params in (("base nn.Linear", lambda: base(x), []),
                              ("PEFT formulation", peft_like, [A, B]),
                              ("lora_ext LinearLoRA", lambda: layer(x), [A, B])):
        with torch.no_grad():
            decode = per_call_us(fwd, device)
        train_fwd = per_call_us(fwd, device)
        fwd_bwd = per_call_us(lambda: torch.autograd.grad(fwd(), [x, *params], g), device)
        rows.append((name, f"{decode:.1f}", f"{train_fwd:.1f}", f"{fwd_bwd:.1f}"))
    print(f"host time per call, µs ({device}, torch {torch.__version__})")
    print(common.markdown_table(["provider", "no_grad fwd", "fwd (grad)", "fwd+bwd"], rows))


if __name__ == "__main__":
    main()
