"""A/B of the ATen compositions the native CUDA path can use, piece by piece (H200, bf16).

The native path is cuBLAS GEMMs plus small steps; which order of GEMMs is cheapest
(a beta=1 epilogue on the big GEMM vs on the small one, a merged weight W + s B A,
a token-split reduction vs one thin GEMM) is a measurement, not a guess. Each line
prints the do_bench median (L2 flushed) and its ratio to the frozen base GEMM of the
same shape, measured in the same run (METHOD.md: same-run ratios only).

    python benchmarks/compose_ab.py [--shapes 4096x1024 4096x4096 ...] [--rank 16]
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402,F401  (registers torch.ops.lora.*)


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3  # us


def split_reduce(a, b, chunks):
    """a^T b over M tokens as `chunks` batched GEMMs with float32 partials, then a sum (lora_aten.cpp)."""
    M = a.shape[0]
    rows = M // chunks
    a3 = a[: rows * chunks].reshape(chunks, rows, -1).transpose(1, 2)
    b3 = b[: rows * chunks].reshape(chunks, rows, -1)
    return torch.bmm(a3, b3, out_dtype=torch.float32).sum(0).to(a.dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["4096x1024", "4096x4096", "4096x14336", "14336x4096"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("-M", type=int, default=8192)
    args = parser.parse_args()
    dev, dt, M, r, s = "cuda", torch.bfloat16, args.M, args.rank, 2.0
    for shape in args.shapes:
        K, N = map(int, shape.split("x"))
        x = torch.randn(M, K, device=dev, dtype=dt)
        W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
        A = torch.randn(r, K, device=dev, dtype=dt) / K**0.5
        B = torch.randn(N, r, device=dev, dtype=dt)
        g = torch.randn(M, N, device=dev, dtype=dt)
        xa = x @ A.t()
        gxa = (g @ B) * s
        y = torch.empty(M, N, device=dev, dtype=dt)
        dx = torch.empty(M, K, device=dev, dtype=dt)
        results = {}

        def fwd_current():
            xa_ = torch.mm(x, A.t())
            y_ = torch.addmm(y, xa_, B.t(), beta=0, alpha=s)
            y_.addmm_(x, W.t())

        def fwd_big_first():
            xa_ = torch.mm(x, A.t())
            y_ = torch.mm(x, W.t())
            y_.addmm_(xa_, B.t(), alpha=s)

        def fwd_merged():
            w_ = torch.addmm(W, B, A, alpha=s)
            torch.mm(x, w_.t())
            torch.mm(x, A.t())

        def adapter_grads():
            """dxa, dB and dA as the token-split composition of edb27fc computed them."""
            gxa_ = torch.mm(g, B).mul_(s)
            split_reduce(g, xa, 32)
            split_reduce(gxa_, x, 8)
            return gxa_

        def bwd_current():
            gxa_ = adapter_grads()
            dx_ = torch.mm(gxa_, A)
            dx_.addmm_(g, W)

        def bwd_big_first():
            gxa_ = adapter_grads()
            dx_ = torch.mm(g, W)
            dx_.addmm_(gxa_, A)

        def bwd_merged():
            adapter_grads()
            w_ = torch.addmm(W, B, A, alpha=s)
            torch.mm(g, w_)

        from lora_ext.kernels import triton_lora as tl_mod

        nodrop = tl_mod._Dropout.make(0.0, None)
        seed = torch.tensor([7], dtype=torch.int64, device=dev)
        mask5 = [True, False, False, True, True]

        def op_fwd(backend, p, position="post"):
            return lambda: torch.ops.lora.linear(x, W, None, A, B, s, p, position, seed, backend)

        def op_bwd(backend, p, position="post"):
            return lambda: torch.ops.lora.linear_backward(g, x, W, A, B, xa, s, p, position, seed, mask5, backend)

        cases = {
            "fwd OP native p0": op_fwd("native", 0.0),
            "fwd OP triton p0": op_fwd("triton", 0.0),
            "fwd OP native p0.1 post": op_fwd("native", 0.1),
            "fwd OP triton p0.1 post": op_fwd("triton", 0.1),
            "fwd OP native p0.1 pre": op_fwd("native", 0.1, "pre"),
            "fwd OP triton p0.1 pre": op_fwd("triton", 0.1, "pre"),
            "fwd T xa = _lora_down": lambda: tl_mod._lora_down(x, A.t(), dt, 1.0, nodrop),
            "fwd T y = _lora_up(xa)": lambda: tl_mod._lora_up(xa, B.t(), nodrop, out=y, out_scale=s),
            "bwd OP native p0": op_bwd("native", 0.0),
            "bwd OP triton p0": op_bwd("triton", 0.0),
            "bwd OP native p0.1 post": op_bwd("native", 0.1),
            "bwd OP triton p0.1 post": op_bwd("triton", 0.1),
            "bwd OP native p0.1 pre": op_bwd("native", 0.1, "pre"),
            "bwd OP triton p0.1 pre": op_bwd("triton", 0.1, "pre"),
            "bwd T gxa+dB = _grad_y_pass": lambda: tl_mod._grad_y_pass(g, B, xa, dt, s, nodrop, True, True),
            "bwd T dx-lora+dA = _lora_up": lambda: tl_mod._lora_up(gxa, A, nodrop, out=dx, inp=x, inp_grad_dtype=dt),
            "fwd base mm(x, W^T)": lambda: torch.mm(x, W.t()),
            "fwd base into y, beta=1": lambda: y.addmm_(x, W.t()),
            "fwd xa = mm(x, A^T)": lambda: torch.mm(x, A.t()),
            "fwd small y = s xa B^T (beta=0)": lambda: torch.addmm(y, xa, B.t(), beta=0, alpha=s),
            "fwd small y += s xa B^T (beta=1)": lambda: y.addmm_(xa, B.t(), alpha=s),
            "fwd merge W' = W + s B A": lambda: torch.addmm(W, B, A, alpha=s),
            "FWD current (small first, big beta=1)": fwd_current,
            "FWD big first, small beta=1": fwd_big_first,
            "FWD merged weight + xa": fwd_merged,
            "bwd base mm(g, W)": lambda: torch.mm(g, W),
            "bwd base into dx, beta=1": lambda: dx.addmm_(g, W),
            "bwd gxa = mm(g, B)": lambda: torch.mm(g, B),
            "bwd dB one mm(g^T, xa)": lambda: torch.mm(g.t(), xa),
            "bwd dB split 32": lambda: split_reduce(g, xa, 32),
            "bwd dA one mm(gxa^T, x)": lambda: torch.mm(gxa.t(), x),
            "bwd dA split 8": lambda: split_reduce(gxa, x, 8),
            "bwd dA split 32": lambda: split_reduce(gxa, x, 32),
            "bwd small dx = gxa A": lambda: torch.mm(gxa, A),
            "bwd small dx += gxa A (beta=1)": lambda: dx.addmm_(gxa, A),
            "BWD current": bwd_current,
            "BWD big first": bwd_big_first,
            "BWD merged weight": bwd_merged,
        }
        for name, fn in cases.items():
            results[name] = bench(fn)
        fwd_base, bwd_base = results["fwd base mm(x, W^T)"], results["bwd base mm(g, W)"]
        print(f"\n== K={K} N={N} M={M} r={r} bf16 (us, ratio to the base GEMM of the same direction)")
        for name, us in results.items():
            ref = fwd_base if name.lower().startswith("fwd") else bwd_base
            print(f"  {name:42s} {us:9.1f} us  {us / ref:6.3f}")
        del x, W, A, B, g, xa, gxa, y, dx
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
