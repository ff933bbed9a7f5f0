"""Host (CPU) time per call of one LoRA linear layer: the Python/dispatcher cost that
eager decode and small layers pay whatever the kernels do.

A tiny layer (K = N = 64, M = 4) keeps the device work negligible, so the per-call
wall time of a long loop is the host's launch path. Printed per provider, in µs.
`--compiled` adds a chain of CHAIN such layers (a decoder layer's seven projections) compiled as
one graph, fwd+bwd, per layer, as bench_train compiles each decoder layer: the graph calls
lora_ext's ops, while PEFT's formulation becomes inductor's own kernels and GEMM calls. The
compiled region's fixed cost (its runtime wrappers, paid once per decoder layer) is spread over
the chain, so the column reads as a LoRA layer's host time in a compiled training step.

    python benchmarks/host_overhead.py [--device cuda] [--compiled]
"""
from __future__ import annotations

import argparse

import torch

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402


def per_call_us(fn, device, calls=2000) -> float:
    return common.wall_us_per_call(fn, calls, device, warmup=200)


CHAIN = 7
RANK, SCALE = 8, 4.0  # LinearLoRA's defaults: dim 8, alpha 32


def peft_formulation(base_out, x, A, B, scale):
    """PEFT's LoRA layer as plain ops: the base output plus s (x Aᵀ) Bᵀ."""
    return base_out + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * scale


class _Chain(torch.nn.Module):
    """CHAIN square layers in sequence, of one provider: frozen base, PEFT's formulation on a frozen
    base, or lora_ext's LinearLoRA."""

    def __init__(self, provider: str, features: int, device):
        super().__init__()
        self.provider = provider
        self.layers = torch.nn.ModuleList()
        for _ in range(CHAIN):
            linear = torch.nn.Linear(features, features, bias=False, device=device)
            if provider.startswith("lora_ext"):
                self.layers.append(lora_ext.LinearLoRA(linear, dim=RANK))
                continue
            linear.requires_grad_(False)
            if provider.startswith("PEFT"):
                linear.lora_A = torch.nn.Parameter(torch.randn(RANK, features, device=device) / features**0.5)
                linear.lora_B = torch.nn.Parameter(torch.randn(features, RANK, device=device) / RANK**0.5)
            self.layers.append(linear)

    def forward(self, x):
        for layer in self.layers:
            y = layer(x)
            x = peft_formulation(y, x, layer.lora_A, layer.lora_B, SCALE) if self.provider.startswith("PEFT") else y
        return x


def compiled_chain_us(provider: str, features: int, device) -> float:
    """µs per layer of a compiled CHAIN-layer fwd+bwd (x requiring grad, as in a middle layer)."""
    chain = torch.compile(_Chain(provider, features, device), fullgraph=True)
    x = torch.randn(4, features, device=device, requires_grad=True)
    params = [x] + [p for p in chain.parameters() if p.requires_grad]
    g = torch.randn(4, features, device=device)
    return per_call_us(lambda: torch.autograd.grad(chain(x), params, g), device, calls=500) / CHAIN


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compiled", action="store_true", help="also fwd+bwd under torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    K = N = 64
    base = torch.nn.Linear(K, N, bias=False, device=device).requires_grad_(False)
    layer = lora_ext.LinearLoRA(torch.nn.Linear(K, N, bias=False, device=device), dim=RANK)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(4, K, device=device, requires_grad=True)
    g = torch.randn(4, N, device=device)

    def peft_like():
        return peft_formulation(base(x), x, A, B, layer.scale)

    rows = []
    for name, fwd, params in (("base nn.Linear", lambda: base(x), []),
                              ("PEFT formulation", peft_like, [A, B]),
                              ("lora_ext LinearLoRA", lambda: layer(x), [A, B])):
        with torch.no_grad():
            decode = per_call_us(fwd, device)
        train_fwd = per_call_us(fwd, device)
        fwd_bwd = per_call_us(lambda: torch.autograd.grad(fwd(), [x, *params], g), device)
        row = [name, f"{decode:.1f}", f"{train_fwd:.1f}", f"{fwd_bwd:.1f}"]
        if args.compiled:
            row.append(f"{compiled_chain_us(name, K, device):.1f}")
        rows.append(row)
    print(f"host time per call, µs ({device}, torch {torch.__version__})")
    print(common.markdown_table(["provider", "no_grad fwd", "fwd (grad)", "fwd+bwd"]
                                + ([f"fwd+bwd compiled, per layer of {CHAIN}"] if args.compiled else []), rows))


if __name__ == "__main__":
    main()
