"""The two numbers (FLOPs and bytes) of the LoRA linear layer at the Llama-3-8B shapes.

Prints the markdown tables of benchmarks/NOTES.md: for each K x N at M tokens, the
frozen base GEMM's FLOPs and its time at the measured bf16 GEMM rate, the FLOPs LoRA
adds, and the bytes of x, y, dY and dX with the time one extra pass over each costs
at the measured copy bandwidth. No GPU needed.

    python benchmarks/floor.py                      # M=8192, r=16, bf16, 790 TFLOP/s, 4.3 TB/s
    python benchmarks/floor.py --rank 64 --m 16
"""
from __future__ import annotations

import argparse

import bench_common as common

SHAPES = {"qo": (4096, 4096), "kv": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16")
    parser.add_argument("--tflops", type=float, default=790.0, help="measured bf16 GEMM rate (H200: ~790)")
    parser.add_argument("--tbps", type=float, default=4.3, help="measured copy bandwidth, read+write (H200: ~4.3)")
    args = parser.parse_args()
    M, r, e = args.m, args.rank, args.bytes_per_element
    flops_rate, byte_rate = args.tflops * 1e12, args.tbps * 1e12

    compute_rows, byte_rows = [], []
    for name, (K, N) in SHAPES.items():
        base_fwd = 2 * M * N * K  # y = x W^T
        base_fb = 2 * base_fwd  # + dX = dY W (base frozen: no dW)
        lora_fwd = 2 * M * r * (K + N)  # x A^T, then (xA^T) B^T
        lora_fb = 3 * lora_fwd  # + dB = dY^T (xA^T), d(xA^T) = dY B, dA = d(xA^T)^T x, dX += d(xA^T) A
        t_fwd, t_fb = base_fwd / flops_rate, base_fb / flops_rate
        # Fewest bytes of the base alone: read x and W, write y (fwd); read dY and W, write dX (bwd).
        x_b, y_b, w_b = e * M * K, e * M * N, e * N * K
        bytes_fwd, bytes_fb = x_b + w_b + y_b, 2 * (x_b + w_b + y_b)
        compute_rows.append([
            f"{K}×{N} ({name})",
            f"{base_fwd / 1e9:.0f} G", us(t_fwd), us(bytes_fwd / byte_rate),
            f"{base_fb / 1e9:.0f} G", us(t_fb), us(bytes_fb / byte_rate),
            f"{lora_fwd / 1e9:.2f} G ({100 * lora_fwd / base_fwd:.2f}%)",
            f"{lora_fb / 1e9:.2f} G ({100 * lora_fb / base_fb:.2f}%)",
            us(1.05 * t_fwd) + " / " + us(1.05 * t_fb),
        ])
        pass_x, pass_y = x_b / byte_rate, y_b / byte_rate
        byte_rows.append([
            f"{K}×{N} ({name})",
            f"{x_b / 2**20:.0f} MiB", f"{y_b / 2**20:.0f} MiB", f"{w_b / 2**20:.0f} MiB",
            f"{us(pass_x)} ({100 * pass_x / t_fwd:.1f}% / {100 * pass_x / t_fb:.1f}%)",
            f"{us(pass_y)} ({100 * pass_y / t_fwd:.1f}% / {100 * pass_y / t_fb:.1f}%)",
            us(0.05 * t_fwd) + " / " + us(0.05 * t_fb),
        ])

    print(f"M = {M}, r = {r}, {e} bytes per element, {args.tflops:g} TFLOP/s, {args.tbps:g} TB/s "
          f"(command: `{common.command_line()}`)\n")
    print(common.markdown_table(
        ["K×N (role)", "base fwd FLOPs", "at GEMM rate", "its bytes at copy rate", "base fwd+bwd FLOPs",
         "at GEMM rate", "its bytes at copy rate", "LoRA extra FLOPs fwd", "LoRA extra FLOPs fwd+bwd",
         "5% target (fwd / fwd+bwd)"],
        compute_rows))
    print()
    print(common.markdown_table(
        ["K×N (role)", "x (= dX)", "y (= dY)", "W", "one extra pass over x or dX (% of base fwd / fwd+bwd)",
         "one extra pass over y or dY (% of base fwd / fwd+bwd)", "5% budget (fwd / fwd+bwd)"],
        byte_rows))


if __name__ == "__main__":
    main()
