"""Where the time of one LinearLoRA fwd+bwd goes on CUDA: torch.profiler kernel table, then the
host side (CPU activity: the ops and launches by self CPU time; the profiler's own cost inflates
every row, so read the shares, not the µs).

Usage: python scripts/profile_layer.py K N [r] [dropout] [backend]
"""
import sys

import torch

import lora_ext


def main():
    K, N = int(sys.argv[1]), int(sys.argv[2])
    r = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    p = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    backend = sys.argv[5] if len(sys.argv) > 5 else "native"
    M = 8192
    layer = lora_ext.LinearLoRA(torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16), dim=r, dropout=p)
    layer.lora_backend = backend
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        layer(x).backward(g)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            layer(x).backward(g)
        torch.cuda.synchronize()
    print(f"K={K} N={N} r={r} p={p} backend={backend} (5 iterations)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=90))
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            layer(x).backward(g)
        torch.cuda.synchronize()
    print("host side, same layer (5 iterations), by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
