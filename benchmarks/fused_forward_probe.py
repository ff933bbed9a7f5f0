"""The fused LoRA forward (lora_ext/kernels/fused_forward.py) against cuBLAS, per shape (H200, bf16).

For each Llama-3-8B shape at M tokens, in one run (METHOD.md: same-run ratios only), the do_bench
median (L2 flushed) of:
  base        F.linear(x, W): the frozen layer, the floor
  op p=0      torch.ops.lora.linear, dropout 0 (the op's current path)
  op p=0 composed   the same with the op's fused forward turned off (set_fused_forward(False))
  op p=0.1    the same, 'post' dropout 0.1
  gemm[cfg]   the fused kernel without the LoRA term (HAS_LORA=False): Triton's GEMM alone
  fused[cfg]  the fused kernel, p=0 and p=0.1
for a few tile configurations; each fused result is first checked against float64.

    python benchmarks/fused_forward_probe.py [--shapes qo kv ...] [--rank 16] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton.testing

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402,F401  (registers torch.ops.lora.*)
from lora_ext.kernels import fused_forward  # noqa: E402
from lora_ext.reference import lora_linear_reference  # noqa: E402

SHAPES = {"qo": (4096, 4096), "kv": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
CONFIGS = {
    "256x3": dict(block_m=128, block_n=256, block_k=64, epilogue_chunks=4, num_stages=3, num_warps=8),
    "256x4": dict(block_m=128, block_n=256, block_k=64, epilogue_chunks=4, num_stages=4, num_warps=8),
    "128x4": dict(block_m=128, block_n=128, block_k=64, epilogue_chunks=2, num_stages=4, num_warps=8),
    "m256x3": dict(block_m=256, block_n=128, block_k=64, epilogue_chunks=2, num_stages=3, num_warps=8),
}


def bench_us(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="none: the op's timings only")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--runs", type=int, nargs="*", default=[None], help="forced runs per row (default: auto)")
    parser.add_argument("--time-budget", type=float, default=400.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, device, scale, p = torch.bfloat16, "cuda", 2.0, 0.1
    seed = torch.tensor([20261129], dtype=torch.int64, device=device)
    start = time.time()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"M={args.tokens} r={args.rank} bf16; us = do_bench median; ratio to base in the same run")
    for shape in args.shapes:
        K, N = SHAPES[shape]
        M, r = args.tokens, args.rank
        x = torch.randn(M, K, device=device, dtype=dtype)
        W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
        A = torch.randn(r, K, device=device, dtype=dtype) / K**0.5
        B = torch.randn(N, r, device=device, dtype=dtype) / r**0.5
        base = bench_us(lambda: F.linear(x, W))
        line = [f"{shape} {K}x{N}: base {base:.1f} us"]
        for name, dp, fused in (("op p=0", 0.0, True), ("op p=0 composed", 0.0, False), ("op p=0.1", p, True)):
            previous = lora_ext._C.set_fused_forward(fused)  # the op's own choice when True (use_fused_forward)
            try:
                t = bench_us(lambda: torch.ops.lora.linear(x, W, None, A, B, scale, dp, "post", seed))
            finally:
                lora_ext._C.set_fused_forward(previous)
            line.append(f"{name} {t:.1f} ({t / base:.3f})")
        print("; ".join(line), flush=True)
        for cfg_name in args.configs:
            cfg = CONFIGS[cfg_name]
            for runs in args.runs:
                if time.time() - start > args.time_budget:
                    print("time budget spent")
                    return
                tag = f"{cfg_name}" + (f" runs={runs}" if runs else "")
                try:
                    for dp in (0.0, p):  # float64 check first
                        y, xa = fused_forward.linear_forward(x, W, None, A, B, scale, dp, seed, runs=runs, **cfg)
                        ref = lora_linear_reference(x, W, None, A, B, scale, dp, "post", seed)
                        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                        xa_ref = x.double() @ A.double().t()
                        xa_err = ((xa.double() - xa_ref).abs().max() / xa_ref.abs().max()).item()
                        ok = err < 2e-2 and xa_err < 2e-2
                        if not ok:
                            print(f"  {tag} p={dp}: WRONG rel err y {err:.2e} xa {xa_err:.2e}")
                    gemm = bench_us(lambda: fused_forward.linear_forward(x, W, None, A, B, scale, has_lora=False,
                                                                         runs=runs, **cfg))
                    f0 = bench_us(lambda: fused_forward.linear_forward(x, W, None, A, B, scale, runs=runs, **cfg))
                    f1 = bench_us(lambda: fused_forward.linear_forward(x, W, None, A, B, scale, p, seed, runs=runs,
                                                                       **cfg))
                    print(f"  {tag}: gemm {gemm:.1f} ({gemm / base:.3f}) fused p=0 {f0:.1f} ({f0 / base:.3f}) "
                          f"p=0.1 {f1:.1f} ({f1 / base:.3f}); check err y {err:.1e} xa {xa_err:.1e}", flush=True)
                except Exception as exc:  # a config that does not compile or fit: report, go on
                    print(f"  {tag}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        del x, W, A, B
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
