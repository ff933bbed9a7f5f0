"""Probe: can a warp-specialised, persistent Gluon GEMM reach cuBLAS on Hopper at k/v's dx shape?

benchmarks/NOTES.md #64/#65/#67: at k/v's input gradient (C = g W, M = 8192, K = 1024, N = 4096, bf16)
the library's Triton GEMM (lora_ext/kernels/fused_forward.py without its LoRA term: 128 x 256 x 64 tiles,
4 stages, one 8-warp program per SM walking row runs) takes ~113 µs against cuBLAS's ~98 (1.15x, H100),
where at q/o (64 K steps per tile) it is ~1.06x. With only 16 K steps per tile, each tile's pipeline
drains and its epilogue runs with no MMA or load in flight; triton's `tl.range(flatten=True)` made it
worse (#65) and `warp_specialize=True` is not applied on Hopper (#64). What would fix it is a
warp-specialised persistent kernel whose epilogue overlaps the next tile's main loop: that is what this
file builds, in Gluon (`triton.experimental.gluon`, triton >= 3.6), to measure it alone.
If it reaches cuBLAS here, a later change builds the LoRA terms into it.

The kernel ("ping-pong", as CUTLASS's sm90 kernel of that name), one persistent program per SM:
  load partition      1 warp (a warpgroup's slot in the register file: see LAUNCH), 40 registers:
                      walks this program's tiles (grouped order, GROUP_M row blocks per group, for
                      L2 reuse) and their K steps, and issues TMA loads of A's and B's tiles into a
                      ring of STAGES shared-memory slots (ready/empty mbarriers).
  consumer 0 / 1      one warpgroup each, 232 registers (a 128 x 128 fp32 accumulator is 128 per
                      thread): consumer p takes this program's tiles p, p + 2, ..., so while one
                      runs its main loop (async wgmma, one group in flight) the other runs its
                      epilogue (accumulator -> bf16 -> shared memory -> TMA store). Consumer 0 is the
                      default partition, consumer 1 a worker with the same code (PARITY constexpr).
  order barriers      consumer p starts a tile's main loop only after the other consumer has
                      received its previous tile's last K step: the two main loops alternate (the
                      tensor cores serve one at a time, the epilogue hides under the other's), and
                      no consumer waits on a ring slot's mbarrier more than one phase ahead of it
                      (an mbarrier's wait only tells phase parity: two phases ahead would pass).
B is (K x N) row-major (the input gradient's W) or, with B_TRANSPOSED, (N x K) row-major used
transposed (the forward's x W^T: the (BN x BK) tile is fed to wgmma through a permuted view).

Timed per shape, device time (CUDA graph, L2 flushed; bench_common.gpu_us): cuBLAS (torch.mm), the
library's Triton GEMM alone (fused_forward without its LoRA term, where lora_ext is built) and each
Gluon config, with the ratio to cuBLAS; each result first checked against torch.matmul in float32
(relative max error < 1e-2, else marked WRONG). A config that fails to compile or launch is printed
and skipped.

    python benchmarks/gluon_gemm_probe.py [--shapes kv_dx qo_dx kv_fwd qo_fwd] [--configs pp128 pp128s5 ...]

First run (H100 80GB HBM3, triton 3.6.0, torch 2.11.0+cu130; one run, device time, µs and ÷ cuBLAS):
  kv_dx   cuBLAS 96.6   pp128 101.5 (1.050)  pp128s5 105.6 (1.092)  pp128s3 120.5 (1.247)  pp64x256 105.2 (1.088)
  qo_dx   cuBLAS 371.6  pp128 402.5 (1.083)  pp128s5 394.9 (1.063)  pp128s3 506.0 (1.362)  pp64x256 419.3 (1.128)
  kv_fwd  cuBLAS 86.8   pp128 103.8 (1.196)  pp128s5  98.7 (1.138)  pp128s3 131.2 (1.512)  pp64x256 101.6 (1.171)
  qo_fwd  cuBLAS 373.2  pp128 406.0 (1.088)  pp128s5 397.1 (1.064)  pp128s3 511.4 (1.370)  pp64x256 436.1 (1.169)
every result within cuBLAS's own error against float32 (2.6e-3 .. 2.8e-3). (Both runs at bdcca1d's code; its
kernel was then factored into helpers shared with _ws_dx_lora_kernel, the same SASS counts with triton 3.6 and
3.9.) The 09:07 rerun beside the
library's Triton GEMM (results/2026-12-06_h100_0907_gluon/, NOTES.md #67): k/v dx cuBLAS 97.9, Triton 112.9
(1.153), pp128 102.1 (1.043); q/o dx Triton 1.056 against pp128s5 1.061; k/v forward Triton 1.089 against
1.117-1.179; q/o forward Triton 1.060 against pp128s5 1.054. So the ping-pong kernel wins where the tiles
are short (16 K steps) and ties or loses elsewhere: untuned, and 128 x 128 tiles carry less work per byte
loaded than Triton's 128 x 256.

The second kernel, `_ws_dx_lora_kernel` (`gluon_dx_lora`, `--dx-lora`; NOTES.md #68, #69), first run 12-06 10:12 on
an H100, correct, a tie with the library at k/v and a loss at q/o (below): the input gradient with the LoRA term and dA in one launch,
dx = g W + grad_xa A (grad_xa = s g B given; one more K = 16 wgmma per tile) and dA = grad_xa^T x, on column runs
(program = one 128-wide column block of dx and a run of row blocks, ~one program per SM) so that dA's sum over M
stays in registers: the two consumers take alternate row blocks, each keeps a 128 x 16 fp32 dA^T accumulator and
writes it as a float32 partial, summed by torch. The load partition issues each row block's x and grad_xa tiles
by TMA into the consumer's own buffers before that tile's K steps, so they arrive under its main loop (#64's
dA epilogue waited for them: +49 µs at k/v); x's buffer is then dx's TMA-store staging. 128 x 128 x 64 tiles,
4 stages, 209016 B of shared memory, 12 warps, 52 wgmmas with 6 waits, no spills.
Measured (H100, 10:28, results/2026-12-06_h100_1028_dxlora_parts/; --dx-lora-parts ablates it), k/v: 125.8 µs
against the ping-pong GEMM's 101.0; x's tile loads cost +17.2 as one load per tile (+8.8 in 8 row slices, x_chunks),
dA's wgmmas +7 to +10; at best (8 slices) 119.5, and with the s g B and dB launches it needs beside it 151.5 against
the library's 157.5. q/o: 452 alone, 518 with them, against 452.

    python benchmarks/gluon_gemm_probe.py --dx-lora [--dx-lora-parts] [--shapes kv_dx qo_dx]
"""
from __future__ import annotations

import argparse
import traceback

import torch
import triton

import bench_common as common

common.ensure_repo_on_path()

try:  # Gluon is experimental: triton 3.6 (the GPU machine's) and 3.9 spell a few things differently.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # 3.9 renamed the TMA copies (async_load / async_store; the old names raise there); 3.6 has only
    # the old ones. Aliases of builtins are callable from a gluon.jit function.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    GLUON_ERROR = None
except ImportError as exc:  # an older triton: --help still works, main() says why it cannot run
    GLUON_ERROR = exc

# (M, K, N, B transposed): C (M x N) = A (M x K) @ B
SHAPES = {
    "kv_dx": (8192, 1024, 4096, False),   # dx = g W at k/v: g (8192 x 1024), W (1024 x 4096)
    "qo_dx": (8192, 4096, 4096, False),
    "kv_fwd": (8192, 4096, 1024, True),   # y = x W^T at k/v: x (8192 x 4096), W (1024 x 4096)
    "qo_fwd": (8192, 4096, 4096, True),
}
# Tiles are per consumer warpgroup. Shared memory: STAGES x (BM + BN) x BK x 2 B for the ring, plus
# 2 x BM x BN x 2 B for the two consumers' output tiles; sm_90 allows 227 KiB (232448 B) per block.
CONFIGS = {
    "pp128": dict(block_m=128, block_n=128, block_k=64, stages=4),     # 128 + 64 KiB = 192 KiB
    "pp128s5": dict(block_m=128, block_n=128, block_k=64, stages=5),   # 160 + 64 KiB = 224 KiB
    "pp128s3": dict(block_m=128, block_n=128, block_k=64, stages=3),   # 96 + 64 KiB = 160 KiB
    "pp64x256": dict(block_m=64, block_n=256, block_k=64, stages=4),   # 160 + 64 KiB = 224 KiB
}
DEFAULT_CONFIGS = ["pp128", "pp128s5", "pp64x256"]
SMEM_LIMIT = 232448


if GLUON_ERROR is None:

    @gluon.jit
    def _schedule(M, N, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
        """This program's place in the persistent schedule, the same in every partition: (program id,
        programs, row blocks, column blocks, K steps per tile, tiles of this program: pid, pid + nprog, ...)."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        return pid, nprog, num_pid_m, num_pid_n, gl.cdiv(K, BK), gl.cdiv(num_pid_m * num_pid_n - pid, nprog)

    @gluon.jit
    def _tile_coords(tile, num_pid_m, num_pid_n, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
        """(row, column) offsets of output tile `tile` in grouped order: GROUP_M row blocks walk the
        columns together, so the programs working at one time share A's rows and B's columns in L2."""
        in_group = GROUP_M * num_pid_n
        first_m = (tile // in_group) * GROUP_M
        group_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_m
        pid_n = (tile % in_group) // group_m
        return pid_m * BM, pid_n * BN

    @gluon.jit
    def _load_k_steps(a_desc, b_desc, a_bufs, b_bufs, ready, empty, c, off_m, off_n, k_first, k_last,
                      B_TRANSPOSED: gl.constexpr):
        """The loader's K steps k_first .. k_last - 1 of one output tile into the ring, from ring counter c;
        returns the next c. Shared by both kernels' load partitions."""
        BK: gl.constexpr = a_desc.block_type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        for kk in range(k_first, k_last):
            s = c % STAGES
            # Slot s is free once its previous use (counter c - STAGES) was released; for the
            # first STAGES uses parity 1 passes at once (a fresh mbarrier counts as having
            # completed the phase before phase 0).
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            _tma_load(a_desc, [off_m, kk * BK], ready.index(s), a_bufs.index(s))
            if B_TRANSPOSED:
                _tma_load(b_desc, [off_n, kk * BK], ready.index(s), b_bufs.index(s))
            else:
                _tma_load(b_desc, [kk * BK, off_n], ready.index(s), b_bufs.index(s))
            c += 1
        return c

    @gluon.jit
    def _load_partition(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K,
                        GROUP_M: gl.constexpr, B_TRANSPOSED: gl.constexpr):
        """One warp: TMA loads of every K step of this program's tiles, in order, into the ring."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_bufs.type.shape[1] if B_TRANSPOSED else b_bufs.type.shape[2]
        pid, nprog, num_pid_m, num_pid_n, k_tiles, my_tiles = _schedule(M, N, K, BM, BN, BK)
        c = 0  # ring counter over all this program's K steps; consumers count the same way
        for i in range(my_tiles):
            off_m, off_n = _tile_coords(pid + i * nprog, num_pid_m, num_pid_n, BM, BN, GROUP_M)
            c = _load_k_steps(a_desc, b_desc, a_bufs, b_bufs, ready, empty, c, off_m, off_n, 0, k_tiles, B_TRANSPOSED)

    @gluon.jit
    def _k_loop(a_bufs, b_bufs, ready, empty, acc, base, k_tiles, B_TRANSPOSED: gl.constexpr):
        """A consumer's main loop over one tile's K steps (ring counters base ..), one wgmma group left
        in flight on return: its ring slot, (base + k_tiles - 1) % STAGES, is still to be released."""
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        for kk in range(k_tiles):
            c = base + kk
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            if B_TRANSPOSED:
                b_view = b_bufs.index(s).permute((1, 0))  # (BN x BK) K-major -> (BK x BN)
            else:
                b_view = b_bufs.index(s)
            acc = warpgroup_mma(a_bufs.index(s), b_view, acc, use_acc=kk > 0, is_async=True)
            # Keep one wgmma group in flight; the one before it is done, so its slot is released.
            acc = warpgroup_mma_wait(1, deps=(acc,))
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=kk > 0)
        return acc

    @gluon.jit
    def _consumer_partition(c_desc, a_bufs, b_bufs, c_smem, ready, empty, order, M, N, K,
                            GROUP_M: gl.constexpr, B_TRANSPOSED: gl.constexpr, PARITY: gl.constexpr,
                            acc_layout: gl.constexpr):
        """One warpgroup: the main loop and epilogue of this program's tiles PARITY, PARITY + 2, ..."""
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_bufs.type.shape[2]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        pid, nprog, num_pid_m, num_pid_n, k_tiles, my_tiles = _schedule(M, N, K, BM, BN, BK)
        # The accumulator is zeroed once: each tile's first wgmma runs with use_acc=False.
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
        for i in range(PARITY, my_tiles, 2):
            off_m, off_n = _tile_coords(pid + i * nprog, num_pid_m, num_pid_n, BM, BN, GROUP_M)
            base = i * k_tiles  # the ring counter of this tile's first K step (the loader's order)
            # Wait until the other consumer has received tile i - 1's last K step (its ((i-1)//2)-th
            # signal): the main loops alternate, and every ring slot this tile waits on has had its
            # previous phase observed already (by the other consumer, or by this one in this tile).
            mbarrier.wait(order.index(PARITY), ((i - 1) // 2) & 1, pred=i > 0)
            acc = _k_loop(a_bufs, b_bufs, ready, empty, acc, base, k_tiles, B_TRANSPOSED)
            # This tile's operands have all arrived: the other consumer may start its next main loop
            # (its tile i + 1) while this one finishes the MMAs and runs the epilogue.
            mbarrier.arrive(order.index(1 - PARITY), count=1)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((base + k_tiles - 1) % STAGES), count=1)
            # Epilogue: the previous TMA store out of this consumer's tile buffer (two tiles ago) has
            # had a whole main loop to finish; wait for it only now, before overwriting the buffer.
            tma.store_wait(0)
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()  # the generic-proxy writes above, before the TMA (async proxy) reads
            _tma_store(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr):
        """The ring's ready / empty mbarriers and the consumers' two order mbarriers, initialised."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)  # completed by expect's arrival + the TMA bytes
            mbarrier.init(empty.index(s), count=1)  # one arrival by the consumer that read the slot
        for p in gl.static_range(2):
            mbarrier.init(order.index(p), count=1)
        return ready, empty, order

    @gluon.jit
    def _ws_gemm_kernel(a_desc, b_desc, c_desc, M, N, K,
                        GROUP_M: gl.constexpr, STAGES: gl.constexpr, B_TRANSPOSED: gl.constexpr,
                        LOAD_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        dtype: gl.constexpr = a_desc.dtype
        # wgmma's accumulator layout for one warpgroup (4 warps along M): instruction m64nNk16.
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])

        a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        # One output tile per consumer, so one's TMA store can run while the other writes its own.
        c_smem0 = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
        c_smem1 = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
        ready, empty, order = _ring_barriers(STAGES)

        gl.warp_specialize([
            (_consumer_partition, (c_desc, a_bufs, b_bufs, c_smem0, ready, empty, order, M, N, K,
                                   GROUP_M, B_TRANSPOSED, 0, acc_layout)),
            (_consumer_partition, (c_desc, a_bufs, b_bufs, c_smem1, ready, empty, order, M, N, K,
                                   GROUP_M, B_TRANSPOSED, 1, acc_layout)),
            (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M, B_TRANSPOSED)),
        ], [4, 1], [CONSUMER_REGS, LOAD_REGS])

    # ---- dx = g W + grad_xa A with dA^T partials (NOTES.md #59 change 1, #64, #67, #68, #69) ----
    # Names as in the host wrapper gluon_dx_lora: g (M x K), W (K x N), A (r x N), x (M x N), grad_xa (M x r),
    # dx (M x N). Compiled for sm_90 with triton 3.6 and 3.9; run on an H100 since 12-06 10:12 (NOTES.md #68, #69).
    #
    # Why column runs: dA = grad_xa^T x is a sum over all M rows. To keep it in registers (and deterministic)
    # a program must own one column block of dx (BN columns of x, of dA) and walk row blocks, so program
    # (col, run) takes column block `col` and row blocks [run * rows_per_run, ...); the host picks `runs` so
    # that col_blocks x runs ~ the SM count. Consumers take alternate row blocks of that range (ping-pong,
    # as _ws_gemm_kernel), each with its own dA^T accumulator (BN x R_PAD fp32: 16 registers per thread).
    #
    # Shared memory at BM = BN = 128, BK = 64, R_PAD = 16 (dx_lora_smem_bytes):
    #   ring       STAGES x (128 x 64 + 64 x 128) x 2 B = 4 x 32768 = 131072
    #   x / dx     2 x 128 x 128 x 2 B                  =  65536  (one per consumer; also dx's store staging)
    #   grad_xa    2 x 128 x 16 x 2 B                   =   8192  (one per consumer)
    #   A          16 x 128 x 2 B                       =   4096  (loaded once per program)
    #   mbarriers  (2 x 4 + 2 + 2 + 2 + 1) x 8 B        =    120
    #   total 209016 B of 232448 (compiled: 209296 with alignment); a 5th stage (241800) would not fit,
    #   nor separate dx staging (+65536).
    # The x buffer doubles as dx's staging: the consumer reads x only through its dA wgmma, which is
    # complete (warpgroup_mma_wait(0)) before it writes dx's bf16 tile over it; after the TMA store has
    # read the buffer (store_wait(0)) it releases the buffer (x_empty) for the loader's next x tile.
    #
    # Per-consumer x / grad_xa buffers, not extra ring slots: they are consumed once per tile at its end,
    # by one consumer, and must be held across that consumer's whole epilogue; as ring slots they would
    # block the K ring's order. Each consumer p has x_ready[p] (completed by the TMA bytes of x's and
    # grad_xa's tiles) and x_empty[p] (one arrival when the consumer's dx store has read the buffer).

    @gluon.jit
    def _column_run(M, N, K, rows_per_run, runs, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
        """This program's column run, the same in every partition: (run, first row offset, column offset,
        K steps per tile, row blocks of this run: 0 when the run starts past M)."""
        pid = gl.program_id(0)
        col = pid // runs
        run = pid % runs
        first = run * rows_per_run
        my_tiles = gl.maximum(gl.minimum(rows_per_run, gl.cdiv(M, BM) - first), 0)
        return run, first * BM, col * BN, gl.cdiv(K, BK), my_tiles

    @gluon.jit
    def _dx_lora_load_partition(g_desc, w_desc, lora_a_desc, x_desc, gxa_desc,
                                a_bufs, b_bufs, lora_a_buf, x_bufs, gxa_bufs,
                                ready, empty, lora_a_bar, x_ready, x_empty, M, N, K, rows_per_run, runs,
                                LOAD_X: gl.constexpr, X_CHUNKS: gl.constexpr, X_SPAN: gl.constexpr):
        """One warp: A's tile once; then per row block i (consumer i % 2's j-th, j = i // 2): x's and grad_xa's
        tiles into that consumer's buffers, then the tile's K steps into the ring. LOAD_X False (an ablation,
        --dx-lora-parts): grad_xa's tile alone. X_CHUNKS > 1: x's tile in that many row slices (x_desc's
        block), slice c issued before K step c * (k_tiles // X_SPAN // X_CHUNKS): spread over the first 1 / X_SPAN
        of the main loop, not one 32 KiB HBM read ahead of the tile's first K step (12-06 10:23: the whole tile's
        load cost 20.5 µs at k/v); X_SPAN 2 leaves the last slice half the loop to arrive."""
        BM: gl.constexpr = g_desc.block_type.shape[0]
        BK: gl.constexpr = g_desc.block_type.shape[1]
        BN: gl.constexpr = x_desc.block_type.shape[1]
        X_ROWS: gl.constexpr = x_desc.block_type.shape[0]  # BM // X_CHUNKS
        if LOAD_X:
            x_bytes: gl.constexpr = X_CHUNKS * x_desc.block_type.nbytes + gxa_desc.block_type.nbytes
        else:
            x_bytes: gl.constexpr = gxa_desc.block_type.nbytes
        run, off_m0, off_n, k_tiles, my_tiles = _column_run(M, N, K, rows_per_run, runs, BM, BN, BK)
        # A (R_PAD x BN), rows past r zero-filled by TMA; only where the consumers will wait for it, so that no
        # program exits with a TMA load in flight. (lora_a_bar completes once: the consumers wait on parity 0.)
        mbarrier.expect(lora_a_bar, lora_a_desc.block_type.nbytes, pred=my_tiles > 0)
        _tma_load(lora_a_desc, [0, off_n], lora_a_bar, lora_a_buf, pred=my_tiles > 0)
        c = 0
        for i in range(my_tiles):
            off_m = off_m0 + i * BM
            p = i % 2
            j = i // 2
            # x's tile is issued before the tile's K steps, so that it has the whole main loop to arrive (#64's
            # cost was this load waited for after the loop). The buffer is free once consumer p has stored its
            # tile i - 2 (x_empty[p]'s completion j - 1): parity ((j - 1) & 1) = (j & 1) ^ 1, passing at once
            # for j = 0. That store runs under the other consumer's main loop of tile i - 1, which has
            # k_tiles - STAGES of its K steps to go when the loader gets here, so this rarely waits.
            # Never two phases behind: this loader's own wait for completion j - 2 came first.
            mbarrier.wait(x_empty.index(p), (j & 1) ^ 1)
            mbarrier.expect(x_ready.index(p), x_bytes)
            _tma_load(gxa_desc, [off_m, 0], x_ready.index(p), gxa_bufs.index(p))  # columns past r: zeros
            if LOAD_X and X_CHUNKS > 1:
                per_chunk = k_tiles // X_SPAN // X_CHUNKS
                for ch in gl.static_range(X_CHUNKS):
                    _tma_load(x_desc, [off_m + ch * X_ROWS, off_n], x_ready.index(p),
                              x_bufs.index(p).slice(ch * X_ROWS, X_ROWS))
                    k_last = k_tiles if ch == X_CHUNKS - 1 else (ch + 1) * per_chunk
                    c = _load_k_steps(g_desc, w_desc, a_bufs, b_bufs, ready, empty, c, off_m, off_n,
                                      ch * per_chunk, k_last, False)
            else:
                if LOAD_X:
                    _tma_load(x_desc, [off_m, off_n], x_ready.index(p), x_bufs.index(p))
                c = _load_k_steps(g_desc, w_desc, a_bufs, b_bufs, ready, empty, c, off_m, off_n, 0, k_tiles, False)

    @gluon.jit
    def _dx_lora_consumer(dx_desc, a_bufs, b_bufs, lora_a_buf, x_bufs, gxa_bufs, ready, empty, order,
                          lora_a_bar, x_ready, x_empty, partial_ptr, M, N, K, rows_per_run, runs,
                          PARITY: gl.constexpr, acc_layout: gl.constexpr, da_layout: gl.constexpr,
                          WITH_LORA: gl.constexpr, WITH_DA: gl.constexpr):
        """One warpgroup: row blocks PARITY, PARITY + 2, ... of this program's run: dx's tile (K loop, then the
        LoRA step grad_xa A), dA^T += x^T grad_xa, dx stored from the x buffer; at the end its dA^T partial.
        WITH_LORA / WITH_DA False (ablations, --dx-lora-parts): that wgmma (and dA's partial) left out."""
        BM: gl.constexpr = dx_desc.block_type.shape[0]
        BN: gl.constexpr = dx_desc.block_type.shape[1]
        BK: gl.constexpr = a_bufs.type.shape[2]
        R_PAD: gl.constexpr = gxa_bufs.type.shape[2]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        run, off_m0, off_n, k_tiles, my_tiles = _column_run(M, N, K, rows_per_run, runs, BM, BN, BK)
        x_buf = x_bufs.index(PARITY)
        gxa_buf = gxa_bufs.index(PARITY)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
        dA_t = gl.zeros((BN, R_PAD), dtype=gl.float32, layout=da_layout)
        for i in range(PARITY, my_tiles, 2):
            j = i // 2
            off_m = off_m0 + i * BM
            base = i * k_tiles
            # The order barriers and the ring exactly as _consumer_partition (see there for the phases).
            mbarrier.wait(order.index(PARITY), ((i - 1) // 2) & 1, pred=i > 0)
            acc = _k_loop(a_bufs, b_bufs, ready, empty, acc, base, k_tiles, False)
            mbarrier.arrive(order.index(1 - PARITY), count=1)
            # The LoRA term, one more K = R_PAD step: acc += grad_xa (BM x R_PAD) A (R_PAD x BN). x_ready[p]'s
            # j-th completion (parity j & 1): the loader issued it before this tile's K steps. It cannot be
            # a phase ahead: the loader's j + 1-th load waits for this consumer's x_empty arrival below.
            mbarrier.wait(x_ready.index(PARITY), j & 1)
            mbarrier.wait(lora_a_bar, 0)  # completed once, before this program's first tile: passes after
            if WITH_LORA:
                acc = warpgroup_mma(gxa_buf, lora_a_buf, acc, is_async=True)
            if WITH_DA:
                # dA^T (BN x R_PAD) += x^T (BN x BM) grad_xa (BM x R_PAD): A operand = the x tile seen transposed
                # (an MN-major shared-memory operand, which wgmma accepts for 16-bit types).
                dA_t = warpgroup_mma(x_buf.permute((1, 0)), gxa_buf, dA_t, is_async=True)
            # The last K step's wgmma is the oldest of those in flight: with the epilogue's (two) left it is done.
            if WITH_LORA and WITH_DA:
                acc = warpgroup_mma_wait(2, deps=(acc,))
            elif WITH_LORA or WITH_DA:
                acc = warpgroup_mma_wait(1, deps=(acc,))
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((base + k_tiles - 1) % STAGES), count=1)
            if WITH_DA:
                acc, dA_t = warpgroup_mma_wait(0, deps=(acc, dA_t))
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
            # x's tile has been read (the dA wgmma is complete): its buffer becomes dx's staging.
            x_buf.store(acc.to(dx_desc.dtype))
            fence_async_shared()  # the generic-proxy writes above, before the TMA (async proxy) reads
            _tma_store(dx_desc, [off_m, off_n], x_buf)
            # Wait for the store to have read the buffer, then hand it (and grad_xa's) back to the loader:
            # x_empty[p]'s j-th completion, the one the loader waits for before tile i + 2's x load.
            tma.store_wait(0)
            mbarrier.arrive(x_empty.index(PARITY), count=1)
        # partial[(run, parity), rank, col] = dA^T[col, rank]; a consumer with no row blocks writes zeros, so
        # every (run, parity) slice is written over all N columns (by the run's programs, one per column block).
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, da_layout))
        ranks = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, da_layout))
        base_ptr = partial_ptr + (run * 2 + PARITY).to(gl.int64) * R_PAD * N
        ptrs = base_ptr + gl.expand_dims(ranks, 0) * N + gl.expand_dims(cols, 1)
        if WITH_DA:
            gl.store(ptrs, dA_t, mask=gl.expand_dims(cols, 1) < N)

    @gluon.jit
    def _ws_dx_lora_kernel(g_desc, w_desc, lora_a_desc, x_desc, gxa_desc, dx_desc, partial_ptr,
                           M, N, K, rows_per_run, runs,
                           STAGES: gl.constexpr, LOAD_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                           WITH_LORA: gl.constexpr = True, WITH_DA: gl.constexpr = True,
                           LOAD_X: gl.constexpr = True, X_CHUNKS: gl.constexpr = 1, X_SPAN: gl.constexpr = 1):
        BM: gl.constexpr = dx_desc.block_type.shape[0]
        BN: gl.constexpr = dx_desc.block_type.shape[1]
        R_PAD: gl.constexpr = gxa_desc.block_type.shape[1]
        dtype: gl.constexpr = g_desc.dtype
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
        # dA^T's accumulator: M = BN (x's columns), N = R_PAD: instruction m64n16k16.
        da_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, R_PAD, 16])

        a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + g_desc.block_type.shape, g_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        lora_a_buf = gl.allocate_shared_memory(dtype, lora_a_desc.block_type.shape, lora_a_desc.layout)
        # x's and dx's descriptors have the same layout (the host makes both so; x's block is dx's, or a row
        # slice of it with X_CHUNKS > 1): one buffer, of dx's block, serves.
        x_bufs = gl.allocate_shared_memory(dtype, [2] + dx_desc.block_type.shape, dx_desc.layout)
        gxa_bufs = gl.allocate_shared_memory(dtype, [2] + gxa_desc.block_type.shape, gxa_desc.layout)
        ready, empty, order = _ring_barriers(STAGES)
        x_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        x_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        lora_a_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for p in gl.static_range(2):
            mbarrier.init(x_ready.index(p), count=1)  # expect's arrival + x's and grad_xa's bytes
            mbarrier.init(x_empty.index(p), count=1)  # one arrival by consumer p after its dx store
        mbarrier.init(lora_a_bar, count=1)

        gl.warp_specialize([
            (_dx_lora_consumer, (dx_desc, a_bufs, b_bufs, lora_a_buf, x_bufs, gxa_bufs, ready, empty, order,
                                 lora_a_bar, x_ready, x_empty, partial_ptr, M, N, K, rows_per_run, runs,
                                 0, acc_layout, da_layout, WITH_LORA, WITH_DA)),
            (_dx_lora_consumer, (dx_desc, a_bufs, b_bufs, lora_a_buf, x_bufs, gxa_bufs, ready, empty, order,
                                 lora_a_bar, x_ready, x_empty, partial_ptr, M, N, K, rows_per_run, runs,
                                 1, acc_layout, da_layout, WITH_LORA, WITH_DA)),
            (_dx_lora_load_partition, (g_desc, w_desc, lora_a_desc, x_desc, gxa_desc, a_bufs, b_bufs, lora_a_buf,
                                       x_bufs, gxa_bufs, ready, empty, lora_a_bar, x_ready, x_empty,
                                       M, N, K, rows_per_run, runs, LOAD_X, X_CHUNKS, X_SPAN)),
        ], [4, 1], [CONSUMER_REGS, LOAD_REGS])


def smem_bytes(block_m: int, block_n: int, block_k: int, stages: int) -> int:
    """The kernel's shared memory, as allocated (bf16 operands and output, mbarriers)."""
    return stages * (block_m + block_n) * block_k * 2 + 2 * block_m * block_n * 2 + (2 * stages + 2) * 8


# Registers: 12 warps (consumer 0, consumer 1, and the loader: 1 warp, padded to a warpgroup, since registers
# are allocated per warpgroup); 64K per SM and one block
# per SM: 232 x 4 + 232 x 4 + 40 x 4 = 2016 = 168 x 12 per thread slot, so the kernel launches with
# maxnreg = 168 and setmaxnreg moves the loader's surplus to the consumers (the default partition
# gets what is left: 232).
LAUNCH = dict(num_warps=4, maxnreg=168)
LOAD_REGS, CONSUMER_REGS = 40, 232


def _descriptor(t, block):
    """A host TMA descriptor of a bf16 tensor, blocks of `block`, in the default swizzled shared layout."""
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def _descriptors(a, b, c, b_transposed, block_m, block_n, block_k):
    b_block = [block_n, block_k] if b_transposed else [block_k, block_n]
    return _descriptor(a, [block_m, block_k]), _descriptor(b, b_block), _descriptor(c, [block_m, block_n])


def _check_operand(name: str, t: torch.Tensor) -> None:
    """What the kernels' TMA descriptors need of an operand: bf16, 2-D, row-major, on CUDA, 16-byte aligned,
    not empty (a kernel with no K steps would release a ring slot it never filled)."""
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if t.dtype != torch.bfloat16:
        raise ValueError(f"{name} must be bfloat16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor")
    if t.data_ptr() % 16:
        raise ValueError(f"{name}'s data must be 16-byte aligned for TMA")


def _check_sizes(M: int, N: int, K: int, device: torch.device, block_m: int, block_n: int) -> None:
    """M, N, K multiples of 8 (TMA's 16-byte row strides; tails inside a tile are handled by zero fill and
    clipped stores), a Hopper GPU (warpgroup_mma), and a tile one warpgroup's accumulator holds."""
    if M % 8 or N % 8 or K % 8:
        raise ValueError(f"M, N and K must be multiples of 8, got M={M}, N={N}, K={K}")
    if torch.cuda.get_device_capability(device)[0] != 9:
        raise ValueError("this kernel is for Hopper (sm_90): warpgroup_mma")
    if block_m * block_n > 128 * 128:
        raise ValueError("one warpgroup's fp32 accumulator is at most 128 x 128 (128 registers per thread)")


def gluon_matmul(a: torch.Tensor, b: torch.Tensor, b_transposed: bool, block_m: int = 128, block_n: int = 128,
                 block_k: int = 64, stages: int = 4, group_m: int = 8, num_programs: int | None = None) -> torch.Tensor:
    """C = a @ b (b_transposed=False: b is (K x N)) or a @ b.T (b_transposed=True: b is (N x K)), bf16
    in and out, fp32 accumulation, by the warp-specialised persistent Gluon kernel (sm_90)."""
    if GLUON_ERROR is not None:
        raise RuntimeError(f"this triton ({triton.__version__}) has no usable Gluon: {GLUON_ERROR}")
    for name, t in (("a", a), ("b", b)):
        _check_operand(name, t)
    M, K = a.shape
    N, Kb = (b.shape if b_transposed else (b.shape[1], b.shape[0]))
    if Kb != K:
        raise ValueError(f"reduction sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}"
                         f" (b_transposed={b_transposed})")
    _check_sizes(M, N, K, a.device, block_m, block_n)
    if smem_bytes(block_m, block_n, block_k, stages) > SMEM_LIMIT:
        raise ValueError(f"tiles {block_m}x{block_n}x{block_k} at {stages} stages need "
                         f"{smem_bytes(block_m, block_n, block_k, stages)} B of shared memory (> {SMEM_LIMIT})")
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    a_desc, b_desc, c_desc = _descriptors(a, b, c, b_transposed, block_m, block_n, block_k)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = (min(num_programs or sms, tiles),)
    _ws_gemm_kernel[grid](a_desc, b_desc, c_desc, M, N, K, group_m, stages, b_transposed,
                          LOAD_REGS, CONSUMER_REGS, **LAUNCH)
    return c


def dx_lora_smem_bytes(block_m: int, block_n: int, block_k: int, stages: int, r_pad: int = 16) -> int:
    """_ws_dx_lora_kernel's shared memory, as allocated: the ring, two x tiles (also dx's staging), two
    grad_xa tiles, A's tile, mbarriers (ring 2 x stages, order 2, x_ready / x_empty 2 + 2, A's 1)."""
    return (stages * (block_m + block_n) * block_k * 2 + 2 * block_m * block_n * 2 + 2 * block_m * r_pad * 2
            + r_pad * block_n * 2 + (2 * stages + 7) * 8)


DX_LORA_TILES = dict(block_m=128, block_n=128, block_k=64, stages=4)  # 209016 B: 5 stages would be 241800


def dx_lora_runs(M: int, N: int, block_m: int, block_n: int, sms: int) -> tuple[int, int]:
    """(runs per column block, row blocks per run) for the column-run schedule: about one program per SM
    (col_blocks x runs <= sms where col_blocks <= sms), every run non-empty."""
    row_blocks, col_blocks = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    runs = max(1, min(row_blocks, sms // col_blocks))
    rows_per_run = triton.cdiv(row_blocks, runs)
    return triton.cdiv(row_blocks, rows_per_run), rows_per_run


def gluon_dx_lora(g: torch.Tensor, W: torch.Tensor, A: torch.Tensor, x: torch.Tensor, grad_xa: torch.Tensor,
                  block_m: int = 128, block_n: int = 128, block_k: int = 64, stages: int = 4,
                  sms: int | None = None, with_lora: bool = True, with_da: bool = True,
                  load_x: bool = True, x_chunks: int = 1, x_span: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dA) with dx = g W + grad_xa A and dA = grad_xa^T x, by _ws_dx_lora_kernel (sm_90; compiled for
    sm_90 with triton 3.6 and 3.9; checked against float64 on an H100, NOTES.md #68). g (M, K), W (K, N), A (r, N), x (M, N), grad_xa (M, r),
    r <= 16, bf16. dA: the kernel's float32 partials, (runs x 2, 16, N), summed by torch, then cast.
    with_lora / with_da / load_x False: ablations (--dx-lora-parts): dx without the LoRA step (g W), no dA (None),
    x's tiles not loaded (needs with_da False). x_chunks: x's tile loaded in that many row slices, spread over
    the first 1 / x_span of the tile's K steps (the loader's X_CHUNKS, X_SPAN)."""
    if GLUON_ERROR is not None:
        raise RuntimeError(f"this triton ({triton.__version__}) has no usable Gluon: {GLUON_ERROR}")
    for name, t in (("g", g), ("W", W), ("A", A), ("x", x), ("grad_xa", grad_xa)):
        _check_operand(name, t)
    M, K = g.shape
    N = W.shape[1]
    r = A.shape[0]
    if r > 16:
        raise ValueError(f"rank {r} > 16: the kernel pads the rank to R_PAD = 16 only")
    if W.shape[0] != K or A.shape != (r, N) or x.shape != (M, N) or grad_xa.shape != (M, r):
        raise ValueError(f"shapes do not match: g {tuple(g.shape)}, W {tuple(W.shape)}, A {tuple(A.shape)}, "
                         f"x {tuple(x.shape)}, grad_xa {tuple(grad_xa.shape)}")
    _check_sizes(M, N, K, g.device, block_m, block_n)
    if with_da and not load_x:
        raise ValueError("with_da needs load_x: dA = grad_xa^T x reads x's tiles")
    if x_chunks < 1 or block_m % x_chunks or block_m // x_chunks < 8:
        raise ValueError(f"x_chunks must divide block_m ({block_m}) into slices of at least 8 rows, got {x_chunks}")
    if x_span not in (1, 2):
        raise ValueError(f"x_span must be 1 or 2, got {x_span}")
    if x_chunks > 1 and triton.cdiv(K, block_k) < x_chunks * x_span:
        # Fewer K steps than slices: every slice would be issued before the first K step (one load, not spread).
        raise ValueError(f"x_chunks {x_chunks} x x_span {x_span} needs at least as many K steps, got "
                         f"{triton.cdiv(K, block_k)}")
    r_pad = 16
    if dx_lora_smem_bytes(block_m, block_n, block_k, stages, r_pad) > SMEM_LIMIT:
        raise ValueError(f"tiles {block_m}x{block_n}x{block_k} at {stages} stages need "
                         f"{dx_lora_smem_bytes(block_m, block_n, block_k, stages, r_pad)} B of shared memory")
    if r % 8:  # grad_xa's row stride must be a multiple of 16 bytes for TMA: pad its columns with zeros
        grad_xa = torch.nn.functional.pad(grad_xa, (0, 8 - r % 8))
    if sms is None:
        sms = torch.cuda.get_device_properties(g.device).multi_processor_count
    runs, rows_per_run = dx_lora_runs(M, N, block_m, block_n, sms)
    dx = torch.empty(M, N, dtype=torch.bfloat16, device=g.device)
    partial = torch.empty(runs * 2, r_pad, N, dtype=torch.float32, device=g.device)

    grid = (triton.cdiv(N, block_n) * runs,)
    _ws_dx_lora_kernel[grid](
        _descriptor(g, [block_m, block_k]), _descriptor(W, [block_k, block_n]), _descriptor(A, [r_pad, block_n]),
        _descriptor(x, [block_m // x_chunks, block_n]), _descriptor(grad_xa, [block_m, r_pad]),
        _descriptor(dx, [block_m, block_n]), partial,
        M, N, K, rows_per_run, runs, stages, LOAD_REGS, CONSUMER_REGS, with_lora, with_da, load_x, x_chunks,
        x_span, **LAUNCH)
    return dx, (partial.sum(0)[:r].to(A.dtype) if with_da else None)


def library_triton_gemm():
    """The library's fused Triton GEMM without its LoRA term (fused_forward's has_lora=False: the input
    gradient's form for B row-major, the forward's for B transposed), or None where lora_ext is not built."""
    try:
        from lora_ext.kernels import fused_forward
    except Exception as exc:  # noqa: BLE001 - an unbuilt checkout: the row is left out
        print(f"(no Triton row: lora_ext does not import: {type(exc).__name__})")
        return None

    adapters = {}  # per weight shape: rank-16 adapters, made once, outside the timed calls

    def run(a, b, b_transposed):
        # b is the layer's weight either way: (N x K) for the forward's a b^T, (N_layer x K_layer) for dx = g W.
        # Rank-16 adapters of its shape, unused without the LoRA term but part of the launch's arguments. (The
        # 09:07 run made them inside the timed call: two small memsets in the Triton row's graph. #60 timed the
        # same GEMM with them made outside at 1.155 of cuBLAS (do_bench), the 09:07 row's 1.153.)
        key = (tuple(b.shape), b.dtype, b.device)
        if key not in adapters:
            adapters[key] = (torch.zeros(16, b.shape[1], dtype=a.dtype, device=a.device),
                             torch.zeros(b.shape[0], 16, dtype=a.dtype, device=a.device))
        A, B = adapters[key]
        if b_transposed:
            return fused_forward.linear_forward(a, b, None, A, B, 1.0, has_lora=False)[0]
        return fused_forward.grad_input(a, b, A, B, 1.0, has_lora=False)[0]

    return run


def probe(shape_names, config_names) -> None:
    triton_gemm = library_triton_gemm()
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'shape':8} {'config':10} {'rel err':>9} {'µs':>8} {'÷ cuBLAS':>9}")
    for name in shape_names:
        M, K, N, b_transposed = SHAPES[name]
        torch.manual_seed(0)
        a = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") if b_transposed else \
            torch.randn(K, N, dtype=torch.bfloat16, device="cuda")
        b_op = b.t() if b_transposed else b
        ref = torch.matmul(a.float(), b_op.float())
        scale = ref.abs().max().item()
        cublas = torch.mm(a, b_op)
        err = (cublas.float() - ref).abs().max().item() / scale
        base = common.gpu_us(lambda: torch.mm(a, b_op))
        print(f"{name:8} {'cuBLAS':10} {err:9.2e} {base:8.1f} {1.0:9.3f}")
        if triton_gemm is not None:  # the library's Triton GEMM alone (no LoRA term), its own tiles, same run
            try:
                c = triton_gemm(a, b, b_transposed)
                err = (c.float() - ref).abs().max().item() / scale
                us = common.gpu_us(lambda: triton_gemm(a, b, b_transposed))
                print(f"{name:8} {'triton':10} {err:9.2e} {us:8.1f} {us / base:9.3f}{'' if err < 1e-2 else '  WRONG'}")
            except Exception as exc:  # report and go on
                print(f"{name:8} {'triton':10} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
        for config in config_names:
            tiles = CONFIGS[config]
            try:
                c = gluon_matmul(a, b, b_transposed, **tiles)
                torch.cuda.synchronize()
                err = (c.float() - ref).abs().max().item() / scale
                mark = "" if err < 1e-2 else "  WRONG"
                us = common.gpu_us(lambda: gluon_matmul(a, b, b_transposed, **tiles))
                print(f"{name:8} {config:10} {err:9.2e} {us:8.1f} {us / base:9.3f}{mark}")
            except Exception as exc:  # compile errors, OutOfResources, ...: report and go on
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                print(f"{name:8} {config:10} FAILED: {type(exc).__name__}: {first_line}")
                traceback.print_exc(limit=3)

def float64_canary():
    """A check of the GPU's float64 GEMMs (the probes' references) against the CPU's, callable between steps:
    at 10:12 on 12-06, after kv_dx's rows, qo_dx's float64 references came out wrong (cuBLAS's and the
    ping-pong GEMM's bf16 results agreed with each other and missed ref_gw by 0.80; ref_dA's check read inf)
    while the same references were right at 09:07 without the --dx-lora rows before them. The canary's two
    products have the references' forms (a tall g W, a 16-row grad_xa^T x)."""
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(2048, 4096, dtype=torch.float64, generator=gen),
              torch.randn(4096, 4096, dtype=torch.float64, generator=gen)),
             (torch.randn(16, 8192, dtype=torch.float64, generator=gen),
              torch.randn(8192, 4096, dtype=torch.float64, generator=gen))]
    refs = [a @ b for a, b in pairs]
    on_gpu = [(a.cuda(), b.cuda()) for a, b in pairs]

    def check(after: str) -> None:
        errs = [common.max_relative_error((a @ b).cpu(), ref) for (a, b), ref in zip(on_gpu, refs)]
        state = "ok" if max(errs) < 1e-12 else "BROKEN"
        print(f"  float64 canary after {after}: {state} ({', '.join(f'{e:.1e}' for e in errs)})", flush=True)

    return check


def probe_dx_lora(shape_names, rank: int = 16, scale: float = 2.0, check_only: bool = False,
                  canary=None, parts: bool = False) -> None:
    """--dx-lora: _ws_dx_lora_kernel (dx = g W + grad_xa A and dA = grad_xa^T x in one launch) checked against
    float64 and timed (device time, same run) beside cuBLAS's g W, the ping-pong GEMM alone and, where lora_ext
    is built, the library's today (fused_forward.grad_input + adapter_grads, as benchmarks/dx_grad_a_probe.py).
    check_only: no timings (for compute-sanitizer); canary: float64_canary()'s check, run after each step;
    parts: also the kernel's ablations, each a step from the plain column-run GEMM to the whole kernel (where
    its time over the ping-pong GEMM alone goes: 12-06 10:12, k/v: 127.2 against 101.3 µs)."""
    if check_only:  # every timing reads 0, and the checks still run
        def time_it(fn):
            fn()
            torch.cuda.synchronize()
            return 0.0
    else:
        time_it = common.gpu_us
    canary = canary or (lambda after: None)
    try:
        from lora_ext.kernels import adapter_grads, fused_forward
    except Exception as exc:  # noqa: BLE001 - an unbuilt checkout: the library's rows are left out
        print(f"(no library rows: lora_ext does not import: {type(exc).__name__})")
        adapter_grads = fused_forward = None
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}; "
          f"r = {rank}, scale = {scale}; µs = device time (CUDA graph, L2 flushed), ÷ cuBLAS's g W")
    for name in shape_names:
        M, K, N, b_transposed = SHAPES[name]
        if b_transposed:
            print(f"{name}: not an input-gradient shape, skipped")
            continue
        torch.manual_seed(0)
        # Every tensor made here, outside the timed lambdas. g (M, K) = dY, W (K, N) = the layer's weight
        # (out x in), A (r, N), B (K, r), x (M, N) = the layer input, xa (M, r), grad_xa = s g B.
        g = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        W = torch.randn(K, N, dtype=torch.bfloat16, device="cuda") * K ** -0.5
        A = torch.randn(rank, N, dtype=torch.bfloat16, device="cuda") * N ** -0.5
        B = torch.randn(K, rank, dtype=torch.bfloat16, device="cuda") * rank ** -0.5
        x = torch.randn(M, N, dtype=torch.bfloat16, device="cuda")
        xa = torch.randn(M, rank, dtype=torch.bfloat16, device="cuda")
        grad_xa = (torch.mm(g, B) * scale).to(torch.bfloat16)
        # The float64 references on the CPU: at 10:12, 10:23 and 10:26 (kv_dx, then qo_dx) the GPU's float64
        # products came out wrong at qo_dx (cuBLAS's and the ping-pong GEMM's bf16 results agreed with each other
        # and missed ref_gw by 0.80; dA's check read inf), right at 10:19 (qo_dx first, with float64_canary's
        # tensors on the GPU). Not understood; the GPU's products are kept as a diagnostic line below.
        ref_gw = (g.cpu().double() @ W.cpu().double()).cuda()
        ref_dx = ref_gw + (grad_xa.cpu().double() @ A.cpu().double()).cuda()
        ref_dA = (grad_xa.cpu().double().t() @ x.cpu().double()).cuda()
        gpu_refs = (g.double() @ W.double(), grad_xa.double().t() @ x.double())
        print(f"{name}: the GPU's float64 g W and grad_xa^T x against the CPU's: "
              f"{common.max_relative_error(gpu_refs[0], ref_gw):.1e}, {common.max_relative_error(gpu_refs[1], ref_dA):.1e}",
              flush=True)
        del gpu_refs
        canary(f"{name}: the references")
        tiles = CONFIGS["pp128"]
        rows = []
        base = time_it(lambda: torch.mm(g, W))
        rows.append(("cuBLAS g W", common.max_relative_error(torch.mm(g, W), ref_gw), base))
        canary(f"{name}: cuBLAS g W")
        try:
            err = common.max_relative_error(gluon_matmul(g, W, False, **tiles), ref_gw)
            rows.append(("ping-pong g W (pp128)", err, time_it(lambda: gluon_matmul(g, W, False, **tiles))))
        except Exception as exc:  # report and go on
            print(f"{name} ping-pong FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        canary(f"{name}: the ping-pong GEMM")

        def whole_kernel_row(label, **switches):
            """The whole kernel (dx and dA) with these switches, checked and timed: its µs, or None if it failed."""
            try:
                dx, dA = gluon_dx_lora(g, W, A, x, grad_xa, **switches, **DX_LORA_TILES)
                torch.cuda.synchronize()
                err = max(common.max_relative_error(dx, ref_dx), common.max_relative_error(dA, ref_dA))
                us = time_it(lambda: gluon_dx_lora(g, W, A, x, grad_xa, **switches, **DX_LORA_TILES))
                rows.append((label, err, us))
                return us
            except Exception as exc:  # compile errors, launch errors: report and go on
                print(f"{name} {label} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                traceback.print_exc(limit=3)
                return None

        dx_lora_us = whole_kernel_row("gluon_dx_lora (dx + dA)")
        for label, switches, ref in (("parts: column runs, g W alone", dict(with_lora=False, load_x=False), ref_gw),
                                     ("parts: + the LoRA step", dict(load_x=False), ref_dx),
                                     ("parts: + x's tiles loaded", {}, ref_dx),
                                     ("parts: + x's tiles in 4 slices", dict(x_chunks=4), ref_dx),
                                     ("parts: + x's tiles in 8 slices", dict(x_chunks=8), ref_dx),
                                     ("parts: + x in 8 slices, first half", dict(x_chunks=8, x_span=2), ref_dx),
                                     ("parts: + x in 16 slices", dict(x_chunks=16), ref_dx)) if parts else ():
            try:
                def part(switches=switches):
                    return gluon_dx_lora(g, W, A, x, grad_xa, with_da=False, **switches, **DX_LORA_TILES)[0]

                rows.append((label, common.max_relative_error(part(), ref), time_it(part)))
            except Exception as exc:  # report and go on
                print(f"{name} {label} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        for chunks, span in ((4, 1), (8, 1), (8, 2), (16, 1)) if parts else ():  # the whole kernel, x in slices
            whole_kernel_row(f"gluon_dx_lora, x in {chunks} slices" + (", first half" if span == 2 else ""),
                             x_chunks=chunks, x_span=span)
        canary(f"{name}: gluon_dx_lora")
        g_b_us = time_it(lambda: torch.mm(g, B).mul_(scale))
        rows.append(("g B (cuBLAS; grad_xa)", float("nan"), g_b_us))
        if fused_forward is not None:
            try:
                dx_t, _ = fused_forward.grad_input(g, W, A, B, scale)
                grads = adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, scale)
                torch.cuda.synchronize()
                err = max(common.max_relative_error(dx_t, ref_dx), common.max_relative_error(grads[0], ref_dA))

                def today():
                    fused_forward.grad_input(g, W, A, B, scale)
                    adapter_grads.adapter_grads(grad_xa, x, xa, g, 1.0, scale)

                canary(f"{name}: grad_input + adapter_grads, once")
                rows.append(("today (grad_input + adapter launch)", err, time_it(today)))
                canary(f"{name}: today, timed")
                db_us = time_it(lambda: adapter_grads.grad_B_only(xa, g, scale))
                rows.append(("dB alone (adapter_grads.grad_B_only)", float("nan"), db_us))
                canary(f"{name}: grad_B_only")
                if dx_lora_us is not None:
                    rows.append(("new total (g B + dx_lora + dB alone)", float("nan"), g_b_us + dx_lora_us + db_us))
            except Exception as exc:  # report and go on
                print(f"{name} library rows FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        for label, err, us in rows:
            mark = "  WRONG" if err == err and err >= 1e-2 else ""  # nan: a row with no check
            print(f"{name:6} {label:38} {err:9.2e} {us:8.1f} {us / base if base else 0:7.3f}{mark}", flush=True)
        del g, W, A, B, x, xa, grad_xa, ref_gw, ref_dx, ref_dA
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS),
                        help="; ".join(f"{k}: {v}" for k, v in CONFIGS.items()))
    parser.add_argument("--dx-lora", action="store_true",
                        help="instead: the dx + dA kernel (_ws_dx_lora_kernel, r = 16) at the dx shapes among --shapes "
                             "(default kv_dx qo_dx), checked against float64 and timed beside cuBLAS, the ping-pong "
                             "GEMM alone and the library's grad_input + adapter_grads")
    parser.add_argument("--dx-lora-parts", action="store_true", help="with --dx-lora: also its ablations (the "
                        "column-run GEMM alone, + the LoRA step, + x's tile loads), each timed and checked")
    parser.add_argument("--check-only", action="store_true", help="with --dx-lora: the checks without the "
                        "timings (for compute-sanitizer, under which a timing loop would take minutes)")
    parser.add_argument("--canary", action="store_true", help="with --dx-lora: after each step, a float64 GEMM "
                        "on the GPU against the CPU's (float64_canary)")
    args = parser.parse_args()
    if GLUON_ERROR is not None:
        raise SystemExit(f"this triton ({triton.__version__}) has no usable Gluon: {GLUON_ERROR}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (Hopper, sm_90)")
    if args.dx_lora:
        probe_dx_lora([s for s in args.shapes if not SHAPES[s][3]],  # the dx shapes: kv_dx, qo_dx by default
                      check_only=args.check_only, canary=float64_canary() if args.canary else None,
                      parts=args.dx_lora_parts)
        return
    probe(args.shapes, args.configs)


if __name__ == "__main__":
    main()
