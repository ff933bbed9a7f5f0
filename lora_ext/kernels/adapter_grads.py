"""Both adapter gradients of the dropout-free backward in one Triton launch, without partials
(and dA alone, `grad_A_only`, where the 'post' dropout backward's masked step gives dB).

    dA = scale_A * grad_xaᵀ x      (r, K)     grad_xa (M, r), x (M, K)
    dB = scale_B * (xaᵀ g)ᵀ        (N, r)     xa (M, r),      g (M, N)

Both are `smallᵀ big`: an (r, C) output, thin, whose reduction runs over all M tokens. The
time is reading the big operand (x, g) once: at 4096 x 1024, M = 8192, 80 MiB, ~20 µs at the
H200's ~4 TB/s. cuBLAS runs each as a split-K GEMM plus a reduce kernel (four launches; 25 + 8 +
2 x 2 µs there, benchmarks/NOTES.md #31). Here one program owns BLOCK_C columns of one output and
walks all M rows: no split of the reduction, so no float32 partials (no extra memory), no atomics
and a fixed summation order (bitwise reproducible). Parallelism comes from the columns: K / BLOCK_C
programs for dA and N / BLOCK_C for dB, in one grid (64 + 16 at k/v with 64 columns), each
streaming BLOCK_M x BLOCK_C tiles of its big operand through a software pipeline (tile_config).

Streamed (`streamed=True`; the op's switch lora_ext._C.set_fused_adapter_grads_streamed,
LORA_EXT_ADAPTER_GRADS_STREAMED=1; off by default: slower than the default launch on an H100, benchmarks/NOTES.md #42):
where the 64-column blocks are at most three quarters of the SMs (k/v's 80 at 132: 52 SMs idle; dA
alone's 64, which the rule runs as 128 programs of 32 columns) the (column block, row tile) pairs
are dealt out in equal contiguous runs to one program per SM (stream-K): a program's run covers
the end of one column block and the start of the next, its float32 sum for each goes to its own
slot of a workspace, and a second launch adds each block's slots in program order (one summation
order: still bitwise reproducible; 0.82 MiB of workspace at k/v, r = 16).

Any strides; the small operands' r is padded to 16 for the MMA by masked loads. The operands of
all four share one 16-bit dtype (float16/bfloat16), float32 accumulation, outputs in that dtype.
Under TRITON_INTERPRET=1 it runs on CPU tensors (float16; the CI tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_facts, replay

# Tiles (benchmarks/NOTES.md #40; the H200's sweep of 12-05 05:10, M = 8192, r = 16, device time).
# Each program streams BLOCK_M x BLOCK_C tiles of its big operand with a few in flight; the kernel is
# bound by how many bytes are in flight across the GPU, so the choice follows the number of
# programs, counted in 64-column blocks against the SMs:
# - at least one per SM (gate/up, down: 288 at 132 SMs): 128 x 64, 3 stages — 80.0 µs against
#   cuBLAS's 87.3-87.5 (the 128 x 32 x 4 of before: 111-112);
# - more than half an SM's worth (k/v: 80, q/o: 128): 256 x 64, 4 stages (k/v 31.0 against 36.3
#   for 128 x 64 x 4 and 38.6 before; cuBLAS 39.2; q/o 41.9, cuBLAS 52.2);
# - fewer (dA alone over 4096 columns: 64): 32 columns, twice the programs, 256 x 32 x 4 (27.5
#   against 30.2 for 256 x 64 x 4).
# Stages come off while the ring does not fit a block's shared memory (r = 64 at 256 x 64: 4 x 64 KiB).
# The thresholds are the H200's; a GPU with fewer SMs (an H100 PCIe's 114) moves q/o's 128 blocks into
# the first branch, unmeasured there.
HOPPER_SHARED_BYTES = 232448
H200_SMS = 132  # the rule's SM count where none is known (the interpreter's CPU tensors)
# The streamed launch only where each program gets at least this many row tiles: below, the second
# launch and the pipeline's start per segment are not paid back (a guess, not measured).
STREAMED_MIN_TILES = 4


def tile_config(columns: int, r_pad: int, num_sms: int = H200_SMS,
                shared_bytes: int = HOPPER_SHARED_BYTES, rows: int = 0, streamed: bool = False) -> dict:
    """The launch's tiles for `columns` output columns in all (K + N for both gradients, K for dA
    alone) at the padded rank r_pad, on a GPU of num_sms SMs whose blocks may use shared_bytes of
    shared memory: block_m, block_c, num_stages, num_warps, and `programs` — 0 for one program per
    column block, else the streamed launch's program count (`streamed` asked for, 64-column blocks
    at most 3/4 of the SMs, and `rows` enough for at least STREAMED_MIN_TILES row tiles per
    program)."""
    blocks = triton.cdiv(columns, 64)
    programs = 0
    if streamed and 4 * blocks <= 3 * num_sms and blocks * triton.cdiv(rows, 256) >= STREAMED_MIN_TILES * num_sms:
        block_m, block_c, stages, programs = 256, 64, 4, num_sms
    elif blocks >= num_sms:
        block_m, block_c, stages = 128, 64, 3
    elif 2 * blocks > num_sms:
        block_m, block_c, stages = 256, 64, 4
    else:
        block_m, block_c, stages = 256, 32, 4
    # Triton keeps up to `stages` buffers of the big tile and the small one (2 bytes per element).
    # (Compiled for sm_90: up to r_pad = 32 it keeps stages - 1 of them, at 64 all `stages`.) Then
    # rows come off, for GPUs with less shared memory per block than Hopper's 227 KiB.
    def ring_bytes():
        return stages * (block_m * block_c + r_pad * block_m) * 2

    while stages > 2 and ring_bytes() > shared_bytes:
        stages -= 1
    while block_m > 64 and ring_bytes() > shared_bytes:
        block_m //= 2
    return dict(block_m=block_m, block_c=block_c, num_stages=stages, num_warps=4, programs=programs)


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory bytes a block may use) of a CUDA device; the H200's for CPU tensors, so that
    the interpreter tests take the rule's GPU choices."""
    return (device_facts.sm_count(device, on_cpu=H200_SMS),
            device_facts.shared_bytes_per_block(device, on_cpu=HOPPER_SHARED_BYTES))


@triton.jit
def _accumulate_tile(acc, small_ptr, big_ptr, m0, M, R, stride_small_m, stride_big_m, big_col_offsets, col_ok,
                     R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc + small[rows, :R]ᵀ big[rows, cols] for the BLOCK_M rows from m0 (the columns given by their
    offsets into big and their in-bounds mask)."""
    ranks = tl.arange(0, R_PAD)
    rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets: x may hold more than 2^31 elements
    row_ok = rows < M
    small = tl.load(small_ptr + rows[None, :] * stride_small_m + ranks[:, None],
                    mask=(ranks < R)[:, None] & row_ok[None, :], other=0.0)  # (R_PAD, BLOCK_M)
    big = tl.load(big_ptr + rows[:, None] * stride_big_m + big_col_offsets[None, :],
                  mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_C)
    return tl.dot(small, big, acc)


@triton.jit
def _thin_product(small_ptr, big_ptr, out_ptr, M, C, R, stride_small_m, stride_big_m, stride_big_c,
                  stride_out_r, stride_out_c, scale, col_block,
                  R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[:, cols] = scale * small[:, :R]ᵀ big[:, cols] for this program's BLOCK_C columns."""
    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    # 64-bit column offsets too: with a column-major big operand (a transposed x), cols * stride_big_c
    # passes 2^31 from 2^31 elements on, in int32 a wrapped address.
    big_col_offsets = cols.to(tl.int64) * stride_big_c
    col_ok = cols < C
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):  # software-pipelined by the launch's num_stages
        acc = _accumulate_tile(acc, small_ptr, big_ptr, m0, M, R, stride_small_m, stride_big_m, big_col_offsets,
                               col_ok, R_PAD, BLOCK_M)
    tl.store(out_ptr + ranks[:, None] * stride_out_r + cols[None, :] * stride_out_c,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=(ranks < R)[:, None] & col_ok[None, :])


@triton.jit
def _adapter_grads_kernel(grad_xa_ptr, x_ptr, grad_A_ptr, xa_ptr, g_ptr, grad_B_ptr, M, K, N, R,
                          stride_grad_xa_m, stride_x_m, stride_x_k, stride_xa_m, stride_g_m, stride_g_n,
                          scale_A, scale_B, blocks_A,
                          R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # Programs [0, blocks_A) own dA's column blocks, the rest dB's; dA (r, K) row-major, dB
    # (N, r) row-major written as the transposed (r, N) product.
    pid = tl.program_id(0)
    if pid < blocks_A:
        _thin_product(grad_xa_ptr, x_ptr, grad_A_ptr, M, K, R, stride_grad_xa_m, stride_x_m, stride_x_k,
                      K, 1, scale_A, pid, R_PAD, BLOCK_M, BLOCK_C)
    else:
        _thin_product(xa_ptr, g_ptr, grad_B_ptr, M, N, R, stride_xa_m, stride_g_m, stride_g_n,
                      1, R, scale_B, pid - blocks_A, R_PAD, BLOCK_M, BLOCK_C)


# The streamed launch (module docstring). One output's work is `blocks * m_tiles` units (column block
# b, row tile t), numbered b-major; program p of `programs` takes units [p U / P, (p + 1) U / P). Its
# sum over the units of block b goes to workspace slot p + b, (R, BLOCK_C) float32: along the units
# each new segment moves to the next block, the next program or both, so p + b grows by at least one
# (no two segments share a slot) and P + blocks - 1 slots hold them all. With at least as many
# programs as blocks (the rule's case) a run meets at most two blocks.


@triton.jit
def _slot_offsets(slot, R, R_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """(R_PAD, BLOCK_C) element offsets of workspace slot `slot`: R rows of BLOCK_C float32 each (rows
    from R on are past the slot: mask them)."""
    return slot * (R * BLOCK_C) + tl.arange(0, R_PAD)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]


@triton.jit
def _thin_product_streamed(small_ptr, big_ptr, work_ptr, M, C, R, stride_small_m, stride_big_m, stride_big_c,
                           program, programs, blocks, m_tiles,
                           R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's run of units of small[:, :R]ᵀ big: per column block met, the float32 sum over
    its rows in the run, stored to the block's slot of work."""
    units = tl.cast(blocks, tl.int64) * m_tiles  # tl.cast: a count equal to 1 arrives as a constexpr
    start = tl.cast(program, tl.int64) * units // programs
    end = (tl.cast(program, tl.int64) + 1) * units // programs
    ranks = tl.arange(0, R_PAD)
    in_block = tl.arange(0, BLOCK_C)
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    # The unit's block and row tile as counters carried through the loop: a 64-bit division per
    # unit is a called subroutine in the SASS, on the path of every prefetch address.
    block = start // m_tiles
    tile = start - block * m_tiles
    for u in range(start, end):  # one pipelined loop over the run, across its block boundary
        cols = block * BLOCK_C + in_block
        col_ok = cols < C
        acc = _accumulate_tile(acc, small_ptr, big_ptr, tile * BLOCK_M, M, R, stride_small_m, stride_big_m,
                               cols * stride_big_c, col_ok, R_PAD, BLOCK_M)
        # The segment ends at the block's last row tile or the run's end: store its sum, start afresh.
        # In a branch: the store's layout change of the accumulator (through shared memory, with
        # barriers) then runs once per segment, not per unit, and at r = 64 the loop's wgmma stays
        # asynchronous (a masked store every unit waited for it: pendings 0; sm_90 compiles).
        last_tile = tile == m_tiles - 1
        if last_tile | (u == end - 1):
            tl.store(work_ptr + _slot_offsets(program + block, R, R_PAD, BLOCK_C), acc,
                     mask=(ranks < R)[:, None] & (in_block < BLOCK_C)[None, :])
            acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
        block = tl.where(last_tile, block + 1, block)
        tile = tl.where(last_tile, 0, tile + 1)


@triton.jit
def _adapter_grads_streamed_kernel(grad_xa_ptr, x_ptr, xa_ptr, g_ptr, work_ptr, M, K, N, R,
                                   stride_grad_xa_m, stride_x_m, stride_x_k, stride_xa_m, stride_g_m, stride_g_n,
                                   programs_A, programs_B, blocks_A, blocks_B, m_tiles, work_offset_B,
                                   R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # Programs [0, programs_A) stream dA's units, the rest dB's; dB's slots start at work_offset_B.
    # One call on operands chosen per program rather than a call per branch: Triton gives each
    # branch's pipelined loop its own shared-memory ring (twice the one-branch kernel's, over the
    # 227 KiB of a block at 256 x 64 x 4, compiled for sm_90).
    pid = tl.program_id(0)
    is_A = pid < programs_A
    _thin_product_streamed(tl.where(is_A, grad_xa_ptr, xa_ptr), tl.where(is_A, x_ptr, g_ptr),
                           tl.where(is_A, work_ptr, work_ptr + work_offset_B), M, tl.where(is_A, K, N), R,
                           tl.where(is_A, stride_grad_xa_m, stride_xa_m), tl.where(is_A, stride_x_m, stride_g_m),
                           tl.where(is_A, stride_x_k, stride_g_n), tl.where(is_A, pid, pid - programs_A),
                           tl.where(is_A, programs_A, programs_B), tl.where(is_A, blocks_A, blocks_B), m_tiles,
                           R_PAD, BLOCK_M, BLOCK_C)


@triton.jit
def _sum_segments(work_ptr, out_ptr, C, R, stride_out_r, stride_out_c, scale, block, programs, blocks, m_tiles,
                  R_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[:, block's columns] = scale * the sum of the block's slots, in program order. The program
    holding unit u is ((u + 1) P - 1) // U (the last p with p U / P <= u)."""
    # tl.cast, not .to: a count equal to 1 arrives as a constexpr (Triton specialises 1 at launch).
    units = tl.cast(blocks, tl.int64) * m_tiles
    first = ((tl.cast(block, tl.int64) * m_tiles + 1) * programs - 1) // units
    last = ((tl.cast(block, tl.int64) + 1) * m_tiles * programs - 1) // units
    ranks = tl.arange(0, R_PAD)
    in_block = tl.arange(0, BLOCK_C)
    rank_ok = (ranks < R)[:, None]
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    for program in range(first, last + 1):
        acc += tl.load(work_ptr + _slot_offsets(program + block, R, R_PAD, BLOCK_C), mask=rank_ok, other=0.0)
    cols = block * BLOCK_C + in_block
    tl.store(out_ptr + ranks[:, None] * stride_out_r + cols[None, :] * stride_out_c,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=rank_ok & (cols < C)[None, :])


@triton.jit
def _adapter_grads_sum_kernel(work_ptr, grad_A_ptr, grad_B_ptr, K, N, R, programs_A, programs_B, blocks_A, blocks_B,
                              m_tiles, work_offset_B, scale_A, scale_B, R_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program per column block: dA's blocks, then dB's.
    pid = tl.program_id(0)
    if pid < blocks_A:
        _sum_segments(work_ptr, grad_A_ptr, K, R, K, 1, scale_A, pid, programs_A, blocks_A, m_tiles, R_PAD, BLOCK_C)
    else:
        _sum_segments(work_ptr + work_offset_B, grad_B_ptr, N, R, 1, R, scale_B, pid - blocks_A, programs_B, blocks_B,
                      m_tiles, R_PAD, BLOCK_C)


DTYPES = (torch.float16, torch.bfloat16)


def supported(grad_xa: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, g2: torch.Tensor) -> bool:
    """Whether adapter_grads computes this call: 2-D tensors on one device, one dtype among DTYPES,
    grad_xa and xa (M, r) with unit last stride and 1 <= r <= 64, x2 (M, K), g2 (M, N), nothing empty."""
    tensors = (grad_xa, x2, xa, g2)
    if any(t.dim() != 2 or t.numel() == 0 for t in tensors):
        return False
    if len({t.dtype for t in tensors}) != 1 or x2.dtype not in DTYPES or len({t.device for t in tensors}) != 1:
        return False
    M, r = xa.shape
    return (grad_xa.shape == xa.shape and x2.shape[0] == M and g2.shape[0] == M and 1 <= r <= 64
            and grad_xa.stride(1) == 1 and xa.stride(1) == 1)


def adapter_grads(grad_xa: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, g2: torch.Tensor,
                  scale_A: float, scale_B: float, streamed: bool = False, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA, dB) = (scale_A grad_xaᵀ x2, scale_B g2ᵀ xa), both in the operands' dtype (`supported`).
    streamed: the streamed launch where tile_config's rule takes it (module docstring). `config`
    overrides tile_config's choice (block_m, block_c, num_stages, num_warps, programs), for the probes."""
    return _launch(grad_xa, x2, xa, g2, scale_A, scale_B, True, streamed, config)


def grad_A_only(grad_xa: torch.Tensor, x2: torch.Tensor, scale_A: float, streamed: bool = False,
                **config) -> torch.Tensor:
    """dA = scale_A grad_xaᵀ x2 alone, where dB comes from elsewhere (the 'post' dropout backward's
    masked step) or is not wanted: the same kernel with dA's programs only (`supported` with
    grad_xa in xa's place and x2 in g2's)."""
    return _launch(grad_xa, x2, grad_xa, x2, scale_A, 0.0, False, streamed, config)[0]


def _launch(grad_xa, x2, xa, g2, scale_A, scale_B, with_B, streamed, config):
    M, r = xa.shape
    K, N = x2.shape[1], g2.shape[1]
    r_pad = max(16, triton.next_power_of_2(r))
    cfg = {**tile_config(K + (N if with_B else 0), r_pad, *_device_limits(xa.device), rows=M, streamed=streamed),
           **config}
    grad_A = torch.empty((r, K), dtype=xa.dtype, device=xa.device)
    # Without dB no program writes it: grad_A stands in for its pointer.
    grad_B = torch.empty((N, r), dtype=xa.dtype, device=xa.device) if with_B else grad_A
    block_c = cfg["block_c"]
    blocks_A = triton.cdiv(K, block_c)
    blocks_B = triton.cdiv(N, block_c) if with_B else 0
    meta = dict(R_PAD=r_pad, BLOCK_C=block_c)
    strides = (grad_xa.stride(0), x2.stride(0), x2.stride(1), xa.stride(0), g2.stride(0), g2.stride(1))
    if not cfg.get("programs"):
        replay.launch(
            _adapter_grads_kernel, (blocks_A + blocks_B,),
            grad_xa, x2, grad_A, xa, g2, grad_B, M, K, N, r, *strides, float(scale_A), float(scale_B), blocks_A,
            BLOCK_M=cfg["block_m"], num_stages=cfg["num_stages"], num_warps=cfg["num_warps"], **meta,
        )
        return grad_A, grad_B
    m_tiles = triton.cdiv(M, cfg["block_m"])
    programs_A, programs_B = _share_programs(cfg["programs"], blocks_A * m_tiles, blocks_B * m_tiles)
    slots_A, slots_B = programs_A + blocks_A - 1, (programs_B + blocks_B - 1 if with_B else 0)
    work = torch.empty((slots_A + slots_B) * r * block_c, dtype=torch.float32, device=xa.device)
    counts = (programs_A, programs_B, blocks_A, blocks_B, m_tiles, slots_A * r * block_c)
    replay.launch(
        _adapter_grads_streamed_kernel, (programs_A + programs_B,),
        grad_xa, x2, xa, g2, work, M, K, N, r, *strides, *counts,
        BLOCK_M=cfg["block_m"], num_stages=cfg["num_stages"], num_warps=cfg["num_warps"], **meta,
    )
    replay.launch(_adapter_grads_sum_kernel, (blocks_A + blocks_B,), work, grad_A, grad_B, K, N, r, *counts,
                  float(scale_A), float(scale_B), num_warps=4, **meta)
    return grad_A, grad_B


def _share_programs(programs: int, units_A: int, units_B: int) -> tuple[int, int]:
    """The streamed launch's programs for dA and dB: in proportion to their units (equal runs), at
    least one each and at most one per unit (no empty run); none for dB without dB (units_B = 0)."""
    if not units_B:
        return min(programs, units_A), 0
    programs_A = min(max(1, round(programs * units_A / (units_A + units_B))), units_A, max(1, programs - 1))
    return programs_A, min(max(1, programs - programs_A), units_B)
