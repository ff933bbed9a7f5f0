"""Where the time of one LoRA layer's call goes on CUDA: torch.profiler kernel table, then the
host side (CPU activity: the ops and launches by self CPU time; the profiler's own cost inflates
every row, so read the shares, not the µs).

Usage: python scripts/profile_layer.py K N [r] [dropout] [backend] [--fwd]
  backend: native, triton, auto (lora_ext's LinearLoRA), or peft / peft_compile (PEFT's LoRA layer on
  the same base, eager or under torch.compile, as benchmarks/bench_linear.py builds it): what a peer's
  kernels are where its ratio differs from ours.
  --fwd: the forward alone (x requiring grad, as bench_linear's fwd rows), not forward + backward.
The base has no bias (as bench_linear's; before 12-06 it had one), and the backward is torch.autograd.grad for
x and the adapters (as bench_linear's fwd+bwd): no gradient accumulation kernels in the table.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

PEERS = ("peft", "peft_compile")


def build_layer(K, N, r, p, backend):
    """The layer as benchmarks/bench_linear.py builds it (alpha 32, 'post' dropout), on a frozen bias-free base."""
    from bench_linear import make_lora_ext_layer, make_peft_layer

    base = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
    if backend in PEERS:
        layer = make_peft_layer(base, r, 32.0, p, A, B, fp32_adapters=False).train(True)
        return torch.compile(layer, dynamic=False) if backend == "peft_compile" else layer
    return make_lora_ext_layer(base, r, 32.0, p, "post", A, B, backend)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("K", type=int)
    parser.add_argument("N", type=int)
    parser.add_argument("r", type=int, nargs="?", default=16)
    parser.add_argument("dropout", type=float, nargs="?", default=0.0)
    parser.add_argument("backend", nargs="?", default="native", choices=("native", "triton", "auto", *PEERS))
    parser.add_argument("--fwd", action="store_true", help="the forward alone")
    args = parser.parse_intermixed_args()
    M = 8192
    layer = build_layer(args.K, args.N, args.r, args.dropout, args.backend)
    x = torch.randn(M, args.K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, args.N, device="cuda", dtype=torch.bfloat16)

    adapters = [p for p in layer.parameters() if p.requires_grad]

    def call():
        y = layer(x)
        if not args.fwd:
            torch.autograd.grad(y, [x, *adapters], g)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    what = "forward" if args.fwd else "forward + backward"
    print(f"K={args.K} N={args.N} r={args.r} p={args.dropout} backend={args.backend}, {what} (5 iterations)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    print("host side, same layer (5 iterations), by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
