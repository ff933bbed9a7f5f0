"""Probe for benchmarks/NOTES.md #64: dA computed inside the input-gradient GEMM (NOTES.md #59, change 1).

Today's dropout-free backward (native path, k/v-sized layers) is two launches besides the base's:
fused_forward.grad_input (dx = g W + (s g B) A, with s g B formed in each run's first tile) and
adapter_grads' one launch (dA = grad_xa^T x and dB = s g^T xa), which reads x (M x K) again: at k/v
64 MiB, the bulk of that launch's 80 MiB. #59 counted that dA could come from the dx GEMM instead,
whose output tile (m, k) sits exactly where x's tile (m, k) does: load x's tile in the epilogue and
accumulate grad_xa[m]^T x[m, k] there. To keep dA's M-long reduction in registers and deterministic,
a program must walk *row* blocks of one column block (a "column run"), so s g B cannot come from
the tile (it would be recomputed once per column block): it is given, as in the 'post' form.

This probe kernel is that schedule, not a library kernel: column runs, grad_xa given, dx stored
in chunks by TMA (fused_forward._epilogue), and with WITH_DA each row block's x tile loaded in
chunks after the main loop and multiplied into per-chunk dA^T accumulators; each run writes its
float32 dA partial, (runs, R_PAD, K), summed by torch afterwards (2 MiB at k/v, over the memory
target: a library version would need fewer row groups or an ordered sum; the probe measures time).

Timed per shape, device time (CUDA graph, L2 flushed; bench_common.gpu_us), one run:
  g W             cuBLAS, the base layer's input gradient (the floor)
  today           fused_forward.grad_input + adapter_grads (dA and dB): what the op launches now
  gemm+given      this kernel without dA (the GEMM on column runs, grad_xa given)
  gemm+given flattened   the same with the row-block loop flattened into its K steps (tl.range flatten)
  gemm+given+dA   this kernel with dA, plus the partials' sum
  g B, dB alone   cuBLAS s g B (grad_xa) and adapter_grads.grad_B_only: what the new design adds
and the new design's total = g B + dB alone + gemm+given+dA. Each result is first checked against float64.

    python benchmarks/dx_grad_a_probe.py [--shapes kv qo ...] [--ranks 16 8] [--tokens 8192]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

import bench_common as common

common.ensure_repo_on_path()
from lora_ext.kernels import adapter_grads, device_facts, fused_forward  # noqa: E402
from lora_ext.kernels.rank_hint import aligned_stride, rank_alignment, rank_mask  # noqa: E402

TensorDescriptor = fused_forward.TensorDescriptor
SHAPES = {"qo": (4096, 4096), "kv": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
SHAPES.update(common.E2E_SHAPES)
# 3 stages, not fused_forward's 4 at k/v: the x chunks and dx's store chunk need shared memory beside them.
PROBE_CONFIG = dict(block_m=128, block_n=256, block_k=64, epilogue_chunks=4, num_stages=3, num_warps=8)


@triton.jit
def _grad_a_chunk(dA_t, x_desc, grad_xa, off_m, off_k):
    """dA^T's (CHUNK, R_PAD) columns off_k.. += x[rows, chunk]^T grad_xa[rows, :]."""
    return tl.dot(x_desc.load([off_m, off_k]).T, grad_xa, dA_t)


@triton.jit
def _store_partial(base, part, off_k, K, CHUNK: tl.constexpr):
    cols = off_k + tl.arange(0, CHUNK)
    tl.store(base + cols[:, None], part, mask=cols[:, None] < K)


@triton.jit
def _dx_grad_a_kernel(g_desc, w_desc, a_desc, x_desc, dx_desc, grad_xa_ptr, partial_ptr,
                      M, N, K, R, stride_grad_xa, rows_per_run, runs_per_col,
                      R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EPILOGUE_CHUNKS: tl.constexpr, WITH_DA: tl.constexpr, FLATTEN: tl.constexpr,
                      WARP_SPECIALIZE: tl.constexpr, RANK_ALIGN: tl.constexpr):
    # dx (M, K) = g (M, N) W (N, K) + grad_xa (M, r) A (r, K). Program = (column block of dx, run of row
    # blocks); adjacent programs share the column block, so W's (N, BLOCK_N) slab is read once into L2.
    CHUNK: tl.constexpr = BLOCK_N // EPILOGUE_CHUNKS
    pid = tl.program_id(0)
    col = pid // runs_per_col
    run = pid % runs_per_col
    off_k = col * BLOCK_N
    first_block = run * rows_per_run
    end_block = tl.minimum(first_block + rows_per_run, tl.cdiv(M, BLOCK_M))
    n_steps = tl.maximum(tl.cdiv(N, BLOCK_K), 1)
    a_tile = a_desc.load([0, off_k])  # (R_PAD, BLOCK_N), zero past r
    ranks = tl.arange(0, R_PAD)
    dA0 = tl.zeros((CHUNK, R_PAD), tl.float32)
    dA1 = tl.zeros((CHUNK, R_PAD), tl.float32)
    dA2 = tl.zeros((CHUNK, R_PAD), tl.float32)
    dA3 = tl.zeros((CHUNK, R_PAD), tl.float32)
    for block in tl.range(first_block, end_block, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        off_m = block * BLOCK_M
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kt in range(n_steps):
            acc = tl.dot(g_desc.load([off_m, kt * BLOCK_K]), w_desc.load([kt * BLOCK_K, off_k]), acc)
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        # The rank hint (rank_hint.py): at r = 8 a 16-byte load per row, not eight 2-byte ones. (Added after the
        # 12-06 runs: their r = 8 rows loaded grad_xa 2 bytes at a time, once per row block, outside the K loop.)
        grad_xa = tl.load(grad_xa_ptr + rows[:, None] * aligned_stride(stride_grad_xa, RANK_ALIGN) + ranks[None, :],
                          mask=(rows[:, None] < M) & rank_mask(ranks, R, RANK_ALIGN)[None, :], other=0.0)
        acc = tl.dot(grad_xa, a_tile, acc)
        fused_forward._epilogue(acc, grad_xa, 0, 0, 0, 0, dx_desc, grad_xa_ptr, grad_xa_ptr, off_m, off_k, K, 0, 1.0,
                                BLOCK_M, BLOCK_N, EPILOGUE_CHUNKS, False, False)
        if WITH_DA:
            dA0 = _grad_a_chunk(dA0, x_desc, grad_xa, off_m, off_k)
            if EPILOGUE_CHUNKS > 1:
                dA1 = _grad_a_chunk(dA1, x_desc, grad_xa, off_m, off_k + CHUNK)
            if EPILOGUE_CHUNKS > 2:
                dA2 = _grad_a_chunk(dA2, x_desc, grad_xa, off_m, off_k + 2 * CHUNK)
                dA3 = _grad_a_chunk(dA3, x_desc, grad_xa, off_m, off_k + 3 * CHUNK)
    if WITH_DA:
        # partial[run, rank, k] = dA^T[k, rank]; columns past K masked (the x chunks past K loaded zeros).
        base = partial_ptr + run.to(tl.int64) * R_PAD * K + ranks[None, :] * K
        _store_partial(base, dA0, off_k, K, CHUNK)
        if EPILOGUE_CHUNKS > 1:
            _store_partial(base, dA1, off_k + CHUNK, K, CHUNK)
        if EPILOGUE_CHUNKS > 2:
            _store_partial(base, dA2, off_k + 2 * CHUNK, K, CHUNK)
            _store_partial(base, dA3, off_k + 3 * CHUNK, K, CHUNK)

def dx_and_grad_a(g: torch.Tensor, W: torch.Tensor, A: torch.Tensor, x: torch.Tensor, grad_xa: torch.Tensor,
                  with_da: bool = True, programs: int | None = None, flatten: bool = False,
                  warp_specialize: bool = False, **config):
    """(dx, dA) with dx = g W + grad_xa A and dA = grad_xa^T x (float32 partials summed by torch; None
    without with_da), on the column-run schedule. g (M, N), W (N, K), A (r, K), x (M, K), grad_xa (M, r)."""
    cfg = {**PROBE_CONFIG, **config}
    block_m, block_n, block_k, chunks = cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["epilogue_chunks"]
    if chunks not in (1, 2, 4):  # the kernel keeps four dA accumulators: more chunks would drop columns
        raise ValueError(f"epilogue_chunks must be 1, 2 or 4, got {chunks}")
    M, N = g.shape
    K = W.shape[1]
    r = A.shape[0]
    r_pad = max(16, triton.next_power_of_2(r))
    row_blocks, col_blocks = triton.cdiv(M, block_m), triton.cdiv(K, block_n)
    if programs is None:
        programs = device_facts.sm_count(g.device, on_cpu=fused_forward.INTERPRETER_PROGRAMS)
    # The same search as the row runs' (fewest waves x longest run), rows and columns swapped; no first-tile cost.
    runs = fused_forward.runs_per_row(col_blocks, row_blocks, programs, 0, block_m)
    rows_per_run = triton.cdiv(row_blocks, runs)
    runs = triton.cdiv(row_blocks, rows_per_run)
    dx = torch.empty((M, K), device=g.device, dtype=g.dtype)
    partial = torch.empty((runs, r_pad, K), device=g.device, dtype=torch.float32) if with_da else dx
    chunk = block_n // chunks
    _dx_grad_a_kernel[(col_blocks * runs,)](
        TensorDescriptor.from_tensor(g, [block_m, block_k]), TensorDescriptor.from_tensor(W, [block_k, block_n]),
        TensorDescriptor.from_tensor(A, [r_pad, block_n]), TensorDescriptor.from_tensor(x, [block_m, chunk]),
        TensorDescriptor.from_tensor(dx, [block_m, chunk]), grad_xa, partial,
        M, N, K, r, grad_xa.stride(0), rows_per_run, runs,
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EPILOGUE_CHUNKS=chunks, WITH_DA=with_da,
        FLATTEN=flatten, WARP_SPECIALIZE=warp_specialize, RANK_ALIGN=rank_alignment(r, grad_xa.stride(0)),
        num_stages=cfg["num_stages"], num_warps=cfg["num_warps"])
    grad_A = partial.sum(0)[:r].to(A.dtype) if with_da else None
    return dx, grad_A


def probe(shapes, ranks, tokens: int, config: dict) -> None:
    torch.manual_seed(0)
    scale = 2.0
    print(f"dA in the dx GEMM (NOTES.md #64), M={tokens} bf16, {config}; us = device time (CUDA graph, L2 flushed); "
          "ratio to cuBLAS's g W in the same run")
    for shape in shapes:
        K, N = SHAPES[shape]
        x, g, W = common.random_bf16(tokens, K), common.random_bf16(tokens, N), common.random_bf16(N, K, std=K**-0.5)
        for r in ranks:
            A, B = common.random_bf16(r, K, std=K**-0.5), common.random_bf16(N, r, std=r**-0.5)
            xa = common.random_bf16(tokens, r)
            grad_xa = (torch.mm(g, B) * scale).to(torch.bfloat16)
            ref_dx = g.double() @ W.double() + grad_xa.double() @ A.double()
            ref_dA = grad_xa.double().t() @ x.double()
            line = [f"{shape} {K}x{N} r={r}"]
            try:
                dx, dA = dx_and_grad_a(g, W, A, x, grad_xa, **config)
                err = max(common.max_relative_error(dx, ref_dx), common.max_relative_error(dA, ref_dA))
                dx_flat, _ = dx_and_grad_a(g, W, A, x, grad_xa, with_da=False, flatten=True, **config)
                err = max(err, common.max_relative_error(dx_flat, ref_dx))
                line.append(f"check err {err:.1e}{' WRONG' if err > 2e-2 else ''}")
            except Exception as exc:  # a variant that does not compile or fit: report, go on
                print(f"{line[0]}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            floor = common.gpu_us(lambda: torch.mm(g, W))

            def today():
                fused_forward.grad_input(g, W, A, B, scale)
                adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, scale)

            timings = {
                "today (grad_input + adapter launch)": common.gpu_us(today),
                "grad_input alone": common.gpu_us(lambda: fused_forward.grad_input(g, W, A, B, scale)),
                "adapter launch alone": common.gpu_us(lambda: adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0,
                                                                                           scale)),
                "gemm+given": common.gpu_us(lambda: dx_and_grad_a(g, W, A, x, grad_xa, with_da=False, **config)),
                # The row-block loop flattened with its K steps for triton's pipeliner (NOTES.md #65): the next
                # tile's loads in flight during this tile's epilogue. Without dA only: with dA it needs 233 KB.
                "gemm+given flattened": common.gpu_us(lambda: dx_and_grad_a(g, W, A, x, grad_xa, with_da=False,
                                                                             flatten=True, **config)),
                "gemm+given+dA": common.gpu_us(lambda: dx_and_grad_a(g, W, A, x, grad_xa, **config)),
                "g B (cuBLAS)": common.gpu_us(lambda: torch.mm(g, B).mul_(scale)),
                "dB alone": common.gpu_us(lambda: adapter_grads.grad_B_only(xa, g, scale)),
            }
            timings["new total (g B + dB alone + gemm+given+dA)"] = (
                timings["g B (cuBLAS)"] + timings["dB alone"] + timings["gemm+given+dA"])
            line.append(f"g W {floor:.1f}")
            line += [f"{name} {t:.1f} ({t / floor:.3f})" for name, t in timings.items()]
            print("; ".join(line), flush=True)
        del x, g, W
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["kv", "qo"], choices=list(SHAPES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--warp-specialize", action="store_true",
                        help="tl.range(warp_specialize=True) on the row-block loop (#64: triton compiled the same "
                             "8-warp kernel for sm_90 with it)")
    parser.add_argument("--stages", type=int, nargs="+", default=[PROBE_CONFIG["num_stages"]],
                        help="pipeline stages of this kernel (4 fits sm_90's shared memory at r <= 16: 221 KB)")
    args = parser.parse_args()
    for stages in args.stages:
        probe(args.shapes, args.ranks, args.tokens, dict(num_stages=stages, warp_specialize=args.warp_specialize))


if __name__ == "__main__":
    main()
