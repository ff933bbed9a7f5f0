"""The native path's dropout pieces (Triton masked thin products) on the GPU: where their
host time goes, what the mask costs, and which tiles run them fastest.

Six parts, each printed as a markdown table and written as CSV rows to --out:

1. host: per-call host time (tiny shapes, so the GPU work is negligible) of each masked
   piece called from Python, of the op through C++ with and without dropout, and of bare
   Triton launches (1 and 30 arguments) as the floor of any Triton launch on this host.
2. floor: at M=8192, r=16 (bf16), GPU time of the mask alone (keep_mask_range over the
   dropped tensor), of one copy pass over it, and of the same thin products on cuBLAS
   without a mask: what a masked piece cannot beat.
3. ranks: the reduction pieces at r = 16 and 64: one pass over dY against two, the
   native CUDA pass, and dA as rows^T inp (default) against inp^T rows.
4. sweep: each piece at the four Llama shapes, over tile shape, warps, stages and
   programs per SM; the best configuration per piece next to the current default.
5. native (not in the default set): the native 'post' backward step (csrc/cuda/masked_grad_y.cu)
   with its two load schemes side by side, at the Llama shapes (8192 tokens) and the end-to-end
   model's (4096), r = 16 and 64, with cuBLAS without a mask for scale.
6. rank_hint (not in the default set): the three pieces and the Triton backend's 'pre' forward at r = 8 and 16,
   with the 16-byte rank hint and without it, same run (NOTES.md #66).

    python benchmarks/masked_pieces.py --out OUT [--parts host floor ranks sweep native rank_hint] [--time-budget S]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import time
import unittest.mock

import torch
import triton
import triton.language as tl

import bench_common as common

common.ensure_repo_on_path()
import lora_ext  # noqa: E402,F401
from lora_ext.kernels import philox, triton_lora  # noqa: E402

SHAPES = {"qo": (4096, 4096), "kv": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
P = 0.1


def host_us(fn, calls=1000) -> float:
    return common.wall_us_per_call(fn, calls, "cuda", warmup=100)


def make_inputs(M, K, N, r, dtype=torch.bfloat16):
    dev = "cuda"
    x2 = torch.randn(M, K, device=dev, dtype=dtype)
    g2 = torch.randn(M, N, device=dev, dtype=dtype)
    A = torch.randn(r, K, device=dev, dtype=dtype) / K**0.5
    B = torch.randn(N, r, device=dev, dtype=dtype) / r**0.5
    xa = torch.randn(M, r, device=dev, dtype=dtype)
    seed = torch.tensor([1234567], dtype=torch.int64, device=dev)
    return x2, g2, A, B, xa, seed


def pieces(x2, g2, A, B, xa, seed):
    """name -> (callable, large operand) of the three masked pieces."""
    return {
        "post_bwd masked_grad_y": (lambda: triton_lora.masked_grad_y(g2, B, xa, 2.0, seed, P, True, True), g2),
        "pre_fwd masked_down": (lambda: triton_lora.masked_down(x2, A, seed, P), x2),
        "pre_bwd masked_up": (lambda: triton_lora.masked_up(xa, A, x2, seed, P, True, True), x2),
    }


def part_host(rows):
    @triton.jit
    def one_arg(p):
        pass

    @triton.jit
    def thirty_args(p0, p1, p2, p3, p4, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16,
                    a17, a18, a19, a20, a21, f0, f1, f2, BLOCK: tl.constexpr):
        pass

    t = torch.empty(16, device="cuda")
    ints = [3 + i for i in range(22)]
    results = {
        "triton launch, 1 arg": host_us(lambda: one_arg[(1,)](t)),
        "triton launch, 30 args": host_us(lambda: thirty_args[(1,)](t, t, t, t, t, *ints, 0.5, 0.5, 0.5, BLOCK=16)),
        "torch.empty (M, r)": host_us(lambda: torch.empty(16, 16, device="cuda")),
    }
    M, K, N, r = 16, 128, 128, 16
    x2, g2, A, B, xa, seed = make_inputs(M, K, N, r)
    for name, (fn, _) in pieces(x2, g2, A, B, xa, seed).items():
        results[f"python {name}"] = host_us(fn)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    x = x2.clone().requires_grad_(True)
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    for p, pos, replayed in ((0.0, "post", True), (P, "post", True), (P, "pre", True), (P, "post", False),
                             (P, "pre", False)):
        def fwd(p=p, pos=pos):
            return torch.ops.lora.linear.default(x, W, None, Ag, Bg, 2.0, p, pos, seed, "native")[0]
        lora_ext._C.set_triton_replay(replayed)
        name = f"p={p} {pos}" + ("" if p == 0 else " C++ replay" if replayed else " Python route")
        with torch.no_grad():
            results[f"op fwd no_grad {name}"] = host_us(fwd)
        results[f"op fwd+bwd {name}"] = host_us(lambda fwd=fwd: torch.autograd.grad(fwd(), [x, Ag, Bg], g))
    lora_ext._C.set_triton_replay(True)
    for name, us in results.items():
        rows.append(dict(part="host", name=name, us=round(us, 1)))
    print(common.markdown_table(["host time per call", "µs"], [(n, f"{u:.1f}") for n, u in results.items()]))
    # Where the Python piece spends it.
    import cProfile
    import pstats

    fn = pieces(x2, g2, A, B, xa, seed)["post_bwd masked_grad_y"][0]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def part_floor(rows, r=16):
    out = []
    for shape, (K, N) in SHAPES.items():
        M = 8192
        x2, g2, A, B, xa, seed = make_inputs(M, K, N, r)
        for tensor_name, t in (("x (pre)", x2), ("dY (post)", g2)):
            rows_, cols = t.shape
            mask_us = common.gpu_us(lambda: philox.keep_mask_range(seed, 0, rows_ * cols, P))
            copy_us = common.gpu_us(lambda: t.clone())
            res = dict(part="floor", shape=shape, name=f"mask of {tensor_name}", us=round(mask_us, 1),
                       copy_us=round(copy_us, 1), elements=t.numel())
            rows.append(res)
            out.append((shape, tensor_name, f"{t.numel() / 1e6:.0f} M", f"{mask_us:.1f}",
                        f"{mask_us * 1e6 / t.numel():.1f}", f"{copy_us:.1f}"))
        cublas = {
            "post_bwd (g B, g^T xa)": common.gpu_us(lambda: (g2 @ B, g2.t() @ xa)),
            "pre_fwd (x A^T)": common.gpu_us(lambda: x2 @ A.t()),
            "pre_bwd (xa A, xa^T x)": common.gpu_us(lambda: (xa @ A, xa.t() @ x2)),
        }
        for name, us in cublas.items():
            rows.append(dict(part="floor", shape=shape, name=f"cuBLAS {name}", us=round(us, 1)))
            out.append((shape, f"cuBLAS {name}, no mask", "", f"{us:.1f}", "", ""))
        # The 'post' forward's LoRA term y = drop(s (x A^T) B^T), without the base GEMM (weight
        # None): the native path (two cuBLAS GEMMs, then the CUDA mask pass in place) against the
        # Triton backend (down pass, then one up pass that writes the masked term once).
        for backend in ("native", "triton"):
            for p in (0.0, P):
                us = common.gpu_us(lambda: torch.ops.lora.linear.default(x2, None, None, A, B, 2.0, p, "post", seed,
                                                                         backend))
                name = f"post_fwd LoRA term, {backend}, p={p}"
                rows.append(dict(part="floor", shape=shape, name=name, us=round(us, 1)))
                out.append((shape, name, "", f"{us:.1f}", "", ""))
    print(common.markdown_table(["shape", "what", "elements", "µs", "ps/element", "copy pass µs"], out))


def patched(fn, **settings):
    """fn with triton_lora's module settings replaced while it runs (e.g. to time another variant)."""
    return lambda: unittest.mock.patch.multiple(triton_lora, **settings)(fn)()


def part_ranks(rows, ranks=(16, 64)):
    """The reduction pieces at r = 16 and 64 (or `ranks`): one pass over dY (default) vs two and vs the
    native CUDA pass, dA as rows^T inp (default) vs inp^T rows, and cuBLAS without a mask."""
    out = []
    for r in ranks:
        for shape, (K, N) in SHAPES.items():
            x2, g2, A, B, xa, seed = make_inputs(8192, K, N, r)
            grad_y = lambda: triton_lora.masked_grad_y(g2, B, xa, 2.0, seed, P, True, True)  # noqa: E731
            up = lambda: triton_lora.masked_up(xa, A, x2, seed, P, True, True)  # noqa: E731
            native = native_step(x2, g2, B, xa, seed)
            results = {
                "masked_grad_y (default)": common.gpu_us(grad_y),
                # Budgets of 0: dxa and dB from two passes over dY.
                "masked_grad_y (two passes)": common.gpu_us(patched(grad_y, MASK_REUSE_BUDGET_BYTES=0,
                                                                    MASK_REUSE_BUDGET_FRACTION=0.0)),
                "cuBLAS (g B, g^T xa), no mask": common.gpu_us(lambda: (g2 @ B, g2.t() @ xa)),
                # What the native path runs (csrc/cuda/masked_grad_y.cu), when built with CUDA.
                "masked_grad_y (native CUDA)": native_with_stages(0, native),
                # The same with the cp.async load scheme (off by default: NOTES.md #36).
                "masked_grad_y (native CUDA, 3 cp.async stages)": native_with_stages(3, native),
                "masked_up (default)": common.gpu_us(up),
                "masked_up (dA as inp^T rows)": common.gpu_us(patched(up, INP_GRAD_AS_ROWS_T=False)),
            }
            for name, us in results.items():
                rows.append(dict(part="ranks", shape=shape, r=r, name=name, us=round(us, 1)))
                out.append((shape, r, name, f"{us:.1f}"))
    print(common.markdown_table(["shape", "r", "what", "µs"], out))


def part_rank_hint(rows):
    """The masked pieces at r = 8 and 16 with the 16-byte rank hint (RANK_ALIGN, benchmarks/NOTES.md #63 and #66)
    as launched and with it off (rank_alignment patched to 1: the variants before the hint), same run, device
    time. At r = 16 the hint is 1 either way: the two columns there are the same variant (a control)."""
    out = []
    for r in (8, 16):
        for shape, (K, N) in SHAPES.items():
            inputs = make_inputs(8192, K, N, r)
            x2, _, A, B, _, seed = inputs
            W = torch.randn(N, K, device="cuda", dtype=x2.dtype) / K**0.5
            timed = {name: fn for name, (fn, _) in pieces(*inputs).items()}
            # The Triton backend's whole forward with 'pre' dropout (its up-projection is _lora_up_kernel).
            timed["triton backend forward, 'pre'"] = lambda: triton_lora.linear_forward(x2, W, None, A, B, 2.0, P,
                                                                                         "pre", seed)
            for name, fn in timed.items():
                on = common.gpu_us(fn)
                off = common.gpu_us(patched(fn, rank_alignment=lambda r, *strides: 1))
                rows.append(dict(part="rank_hint", shape=shape, r=r, name=name, us=round(on, 1),
                                 us_without_hint=round(off, 1)))
                out.append((shape, r, name, f"{on:.1f}", f"{off:.1f}", f"{on / off:.3f}"))
            del inputs, x2, A, B, seed, W, timed
            torch.cuda.empty_cache()
    print(common.markdown_table(["shape", "r", "piece", "µs with the hint", "µs without", "ratio"], out))


def part_sums(rows):
    """The masked pieces as launched and with their partials summed one partial per step (`_sum_blocks` patched
    to the blocks of the kernel before 12-06, the sum as it was: a chain of round trips), r = 16 and 64, same
    run, device time (benchmarks/NOTES.md #70). 'pre' masked_down launches no sum at these shapes, and
    masked_up one at r = 16 only: elsewhere their two columns are the same launches (controls)."""
    def one_per_step(num_parts, n_rows, r_pad, sms):
        return triton_lora.one_partial_per_step_blocks(r_pad)

    out = []
    for r in (16, 64):
        for shape, (K, N) in SHAPES.items():
            inputs = make_inputs(8192, K, N, r)
            for name, (fn, _) in pieces(*inputs).items():
                now = common.gpu_us(fn)
                before = common.gpu_us(patched(fn, _sum_blocks=one_per_step))
                rows.append(dict(part="sums", shape=shape, r=r, name=name, us=round(now, 1),
                                 us_one_partial_per_step=round(before, 1)))
                out.append((shape, r, name, f"{now:.1f}", f"{before:.1f}", f"{now / before:.3f}"))
            del inputs
            torch.cuda.empty_cache()
    print(common.markdown_table(["shape", "r", "piece", "µs", "µs, one partial per step", "ratio"], out))


def part_native(rows, ranks=(16, 64)):
    """The native 'post' backward step alone, its two load schemes and two grid rules side by side
    (NOTES.md #55, #56): the registers one tile ahead (default, two programs per SM at r <= 16) against
    the cp.async ring (three per SM at r <= 16), each with the balanced split of the work (default)
    and the first rule's ('sqrt'); cuBLAS's g B and g^T xa without a mask for scale; device time.
    The step is called as the op calls it, its partials capped at dx's size. `ranks`: r = 16 and 64 unless given."""
    out = []
    for r in ranks:
        # The Llama-3-8B shapes at 8192 tokens, the end-to-end model's at its own 4096.
        for shape, (K, N) in {**SHAPES, **common.E2E_SHAPES}.items():
            M = common.E2E_TOKENS if shape in common.E2E_SHAPES else 8192
            x2, g2, A, B, xa, seed = make_inputs(M, K, N, r)
            step = native_step(x2, g2, B, xa, seed)
            timed = {(stages, rule): native_with_stages(stages, step, rule)
                     for stages in (0, 3) for rule in ("balanced", "sqrt")}
            regs, piped = timed[0, "balanced"], timed[3, "balanced"]
            cublas = common.gpu_us(lambda: (g2 @ B, g2.t() @ xa))
            gib_per_s = M * N * g2.element_size() / 2**30 / 1e-6
            for (stages, rule), us in timed.items():
                name = ("registers" if stages == 0 else "cp.async") + ("" if rule == "balanced" else ", sqrt grid")
                rows.append(dict(part="native", shape=shape, r=r, name=name, us=round(us, 1)))
            rows.append(dict(part="native", shape=shape, r=r, name="cuBLAS no mask", us=round(cublas, 1)))
            out.append((shape, r, M, f"{regs:.1f}", f"{timed[0, 'sqrt']:.1f}", f"{regs / timed[0, 'sqrt']:.3f}",
                        f"{piped:.1f}", f"{timed[3, 'sqrt']:.1f}", f"{piped / regs:.3f}", f"{cublas:.1f}",
                        f"{gib_per_s / regs:.0f}"))
            del x2, g2, A, B, xa
    print(common.markdown_table(["shape", "r", "M", "registers µs", "registers, sqrt grid µs", "balanced ÷ sqrt",
                                 "cp.async µs", "cp.async, sqrt grid µs", "cp.async ÷ registers",
                                 "cuBLAS no mask µs", "registers GiB/s"], out))


def native_step(x2, g2, B, xa, seed):
    """The native 'post' backward step (lora_ext._C.masked_grad_y_cuda, both outputs) as the op calls it
    when dx is wanted: its float32 partials capped at dx's size (csrc/masked_grad_y_grid.h)."""
    return lambda: lora_ext._C.masked_grad_y_cuda(g2, B, xa, 2.0, seed, P, True, True,
                                                  max_partial_bytes=x2.numel() * x2.element_size())


def native_with_stages(stages, fn, grid_rule="balanced"):
    """common.gpu_us(fn) with the native 'post' backward kernel's load scheme set to `stages` and its
    split of the work to `grid_rule` (NaN without the native build)."""
    if not lora_ext._C.has_cuda():
        return float("nan")
    with common.switched((lora_ext._C.set_masked_grad_y_stages, stages),
                         (lora_ext._C.set_masked_grad_y_grid_rule, grid_rule)):
        return common.gpu_us(fn)


def part_sweep(rows, budget_s, r=16):
    default_tile = triton_lora._tile
    default_sms = triton_lora._num_sms
    configs = list(itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (4, 8), (3,), (1,)))
    configs += list(itertools.product((32, 64), (64, 128), (4, 8), (2, 4), (1, 2, 4)))
    data = {shape: make_inputs(8192, K, N, r) for shape, (K, N) in SHAPES.items()}
    t_start = time.time()
    summary = []

    def run(config):
        if config is not None:
            bm, bc, nw, ns, mult = config
            triton_lora._tile = lambda tiles, r_pad, dropout, fp32: triton_lora._Blocks(bm, bc, nw, ns)
            triton_lora._num_sms = lambda device: mult * default_sms(device)
        else:
            triton_lora._tile, triton_lora._num_sms = default_tile, default_sms
        triton_lora._down_plan.cache_clear()
        triton_lora._up_plan.cache_clear()
        timings = {}
        for shape, inputs in data.items():
            for name, (fn, _) in pieces(*inputs).items():
                try:
                    fn()
                    torch.cuda.synchronize()
                    timings[(shape, name)] = common.gpu_us(fn)
                except Exception as exc:  # out of resources etc.: skip this config
                    timings[(shape, name)] = float("inf")
                    err = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
                    rows.append(dict(part="sweep_error", name=name, config=str(config), error=err))
        return timings

    default = run(None)
    best = {key: (us, None) for key, us in default.items()}
    for config in configs:
        if time.time() - t_start > budget_s:
            print(f"sweep: time budget reached after {config}")
            break
        for key, us in run(config).items():
            rows.append(dict(part="sweep", shape=key[0], name=key[1], config=str(config), us=round(us, 1)))
            if us < best[key][0]:
                best[key] = (us, config)
    run(None)
    for (shape, name), us in default.items():
        b_us, b_cfg = best[(shape, name)]
        rows.append(dict(part="sweep_best", shape=shape, name=name, config=str(b_cfg), us=round(b_us, 1),
                         default_us=round(us, 1)))
        summary.append((shape, name, f"{us:.1f}", f"{b_us:.1f}", str(b_cfg)))
    print(common.markdown_table(["shape", "piece", "default µs", "best µs", "best (bm, bc, warps, stages, sms×)"],
                                summary))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--parts", nargs="+", default=["host", "floor", "ranks", "sweep"],
                        choices=["host", "floor", "ranks", "sweep", "native", "rank_hint", "sums"])
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds for the sweep")
    # (h200_run.sh passes PIECES_PARTS unquoted, so PIECES_PARTS="ranks --ranks 64" reaches this.)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="the ranks of the ranks and native parts")
    args = parser.parse_args()
    rows = []
    print(f"{common.utc_now()} {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"lora_ext native: {lora_ext._C.has_cuda()}")
    try:
        if "host" in args.parts:
            part_host(rows)
        if "floor" in args.parts:
            part_floor(rows)
        if "ranks" in args.parts:
            part_ranks(rows, args.ranks)
        if "native" in args.parts:
            part_native(rows, args.ranks)
        if "rank_hint" in args.parts:
            part_rank_hint(rows)
        if "sums" in args.parts:
            part_sums(rows)
        if "sweep" in args.parts:
            part_sweep(rows, args.time_budget)
    finally:
        path = os.path.join(args.out, "masked_pieces.csv")
        keys = sorted({k for row in rows for k in row})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        print("wrote", path)


if __name__ == "__main__":
    main()
