"""The LoRA linear forward as one GEMM: y = x W^T + b + drop_post(s (x A^T) B^T), and xa = x A^T;
and, the same kernel with transposed operands, the dropout-free input gradient dx = g W + (s g B) A
with s g B (grad_input).

Why (benchmarks/NOTES.md, "What the two numbers say", #7 and #26): every base GEMM here is
compute-bound, so bytes a kernel moves while the tensor cores are busy are free and bytes a
separate kernel moves are not. The composed forward pays a separate pass over x for xa
(27 us at 4096x1024, 30% of that base GEMM) and a read-modify-write of y for the LoRA term;
with 'post' dropout one more pass over y for the mask. Here the base GEMM's own x tiles feed
x A^T, and the LoRA term joins the tile's accumulator: without dropout as one more K step
(acc += (s xa) B^T, K = the rank padded to 16), with 'post' dropout as a product of its own
in the epilogue, masked there. The composed input gradient likewise pays a pass over g for g B
and a write and re-read of the LoRA part of dx (NOTES.md #28).

Where it is used: the native CUDA path runs both for dropout-free k/v-sized layers at training
sizes, the forward also at any width with at most 2048 inputs and r <= 16, where Triton's GEMM
matched cuBLAS's (1.02 and 0.96 at 2048x5632 and 2048x32000, 4096 tokens, NOTES.md #52), and the
input gradient also up to 8192 outputs there (NOTES.md #53); grad_input_given_xa at any width with at
most 4096 outputs or at most 2048 inputs, with 'post' dropout and, where the input gradient above does not
take the layer, without it (#53, #93, #95), r <= 16 (csrc/lora_aten.cpp, use_fused_forward /
use_fused_grad_input / fused_grad_input_given; on by default, LORA_EXT_FUSED_FORWARD=0 /
LORA_EXT_FUSED_GRAD_INPUT=0 turn them off), launched from C++ after
the first call with a key (replay.py records the launch, tensor descriptors included): at
4096x1024 the forward measured 1.24-1.28x the base GEMM against the composed 1.35-1.41x, and dx
1.24x cuBLAS's g W against 1.56x (NOTES.md #27, #28). The Triton backend runs the forward from
4096 tokens. The native path also runs it for dropout-free forwards of up to 16 rows and 8192 inputs
(decode) with the few-row tiles of small_m_config: one launch for the whole layer (NOTES.md #44, #48;
on by default, LORA_EXT_FUSED_SMALL_M_FORWARD=0 turns it off). Elsewhere the forward and the input
gradient that forms g B itself lose: Triton's GEMM alone is 0-15% slower than cuBLAS's at the wide shapes
with 4096+ inputs (the form given grad_xa wins at some of them by saving the composed path's (M, K)
round trip: above). The 'post' epilogue cost 20-30% when measured (NOTES.md #26), before #33 found that triton 3.6 serialised every wgmma of that variant,
main loop included, and that its mask moved bytes through shared memory; both mended, it measured
faster than the separate mask pass (#39) and is on by default.

Schedule. The output's (BLOCK_M x BLOCK_N) tiles are grouped into *runs*: a run is a row
block and a contiguous range of its column blocks, processed by one program in order. The
run's first tile also accumulates x A^T (r extra columns of MMA over the x tiles it loads
anyway) and keeps xa in registers for every tile of the run. A row block split into S runs
computes xa S times: S*r/N extra FLOPs (kv, N=1024, r=16, S=2: 3%), against a separate pass
over x, and no program waits on another (no cross-program reduction: deterministic, and no
hang when the GPU is shared). Runs of one row block are adjacent program ids, so programs
running together share W's column blocks in L2.

Operands travel by TMA (tensor descriptors, Hopper and later): the descriptor zero-fills
loads past the edges (rows of A beyond r, columns of B beyond r, K and N tails) and clips the
stores, so the rank is padded to 16 for the MMA without a padded copy of the adapters.
Requirements (`supports`, `layout_supported`): CUDA sm_90+, x/W/A/B/y 2-D with unit last
stride and 16-byte aligned rows and base pointers (K, N, r multiples of 8 for 16-bit types),
one dtype (bfloat16 or float16) for x, W, A, B, r <= 64. The tiles are sized for Hopper's 227 KiB
of shared memory per block; where a GPU has less, the launch fails (OutOfResources) and every
caller composes the product from other kernels instead (`unless_out_of_resources`). Under
TRITON_INTERPRET=1 it runs on CPU tensors (float16; the CI tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import device_facts, replay
from .philox import dropout_keep_bits, dropout_threshold, keep_from_bits

from triton.runtime.errors import OutOfResources

try:  # triton >= 3.3 (host-side TMA descriptors); the op falls back without it
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

MAX_FUSED_RANK = 64


@triton.jit
def _epilogue_chunk(acc, xa, b_chunk, y_desc, bias_ptr, seed_ptr, off_m, off_n, N, drop_threshold, lora_scale,
                    BLOCK_M: tl.constexpr, CHUNK_N: tl.constexpr, LORA_IN_EPILOGUE: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """Columns off_n .. off_n + CHUNK_N of one output tile: acc (float32, x W^T) plus, with 'post'
    dropout, the LoRA term xa B^T masked and scaled by lora_scale = s/(1-p), plus the bias, stored once.
    The LoRA term is its own (BLOCK_M, CHUNK_N) product, so the chunking bounds the registers
    the mask and the term need next to the tile's accumulator; B's chunk (CHUNK_N, R_PAD) was
    loaded before the tile's main loop."""
    out = acc
    if LORA_IN_EPILOGUE:
        lora = tl.dot(xa, b_chunk.T)
        # The mask: one Philox evaluation per group of eight elements, its eight keep bits packed
        # into one integer, then spread over the chunk (benchmarks/NOTES.md #33). The seed is loaded as a
        # (BLOCK_M, CHUNK_N / 8) tile (one address: an L1 broadcast) on purpose: the load pins the
        # Philox to a blocked layout, one evaluation per group, and only the packed bits move to
        # the accumulator's layout (one small shared-memory exchange). Without it Triton computes
        # the Philox in the accumulator's layout, where a thread holds two columns of each group:
        # four times the evaluations (SASS, sm_90a, triton 3.6: 3890 IMAD against 1039). The
        # 8-bit joins of dropout_keep_tile moved bytes through shared memory instead (449 LDS).
        seed_tile = tl.load(seed_ptr + tl.zeros((BLOCK_M, CHUNK_N // 8), tl.int32))
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        bits = dropout_keep_bits(seed_tile.to(tl.uint32), (seed_tile >> 32).to(tl.uint32), rows, off_n, N,
                                 drop_threshold, BLOCK_M, CHUNK_N)
        # Times 0 where dropped, not replaced by 0: a dropped NaN or Inf stays NaN (as torch's dropout).
        out += lora * tl.where(keep_from_bits(bits, BLOCK_M, CHUNK_N), lora_scale, 0.0)
    if HAS_BIAS:
        cols = off_n + tl.arange(0, CHUNK_N)
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y_desc.store([off_m, off_n], out.to(y_desc.dtype))


@triton.jit
def _epilogue(acc, xa, b0, b1, b2, b3, y_desc, bias_ptr, seed_ptr, off_m, off_n, N, drop_threshold, lora_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_CHUNKS: tl.constexpr,
              LORA_IN_EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The tile's accumulator split column-wise into EPILOGUE_CHUNKS (1, 2 or 4) chunks; b0 .. b3
    are B's chunks of the tile (those past EPILOGUE_CHUNKS unused)."""
    if EPILOGUE_CHUNKS == 1:
        _epilogue_chunk(acc, xa, b0, y_desc, bias_ptr, seed_ptr, off_m, off_n, N, drop_threshold, lora_scale,
                        BLOCK_M, BLOCK_N, LORA_IN_EPILOGUE, HAS_BIAS)
    else:
        HALF: tl.constexpr = BLOCK_N // 2
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        if EPILOGUE_CHUNKS == 2:
            _epilogue_chunk(left, xa, b0, y_desc, bias_ptr, seed_ptr, off_m, off_n, N, drop_threshold, lora_scale,
                            BLOCK_M, HALF, LORA_IN_EPILOGUE, HAS_BIAS)
            _epilogue_chunk(right, xa, b1, y_desc, bias_ptr, seed_ptr, off_m, off_n + HALF, N, drop_threshold,
                            lora_scale, BLOCK_M, HALF, LORA_IN_EPILOGUE, HAS_BIAS)
        else:
            QUARTER: tl.constexpr = BLOCK_N // 4
            q0, q1 = tl.split(tl.permute(tl.reshape(left, (BLOCK_M, 2, QUARTER)), (0, 2, 1)))
            q2, q3 = tl.split(tl.permute(tl.reshape(right, (BLOCK_M, 2, QUARTER)), (0, 2, 1)))
            _epilogue_chunk(q0, xa, b0, y_desc, bias_ptr, seed_ptr, off_m, off_n, N, drop_threshold, lora_scale,
                            BLOCK_M, QUARTER, LORA_IN_EPILOGUE, HAS_BIAS)
            _epilogue_chunk(q1, xa, b1, y_desc, bias_ptr, seed_ptr, off_m, off_n + QUARTER, N, drop_threshold,
                            lora_scale, BLOCK_M, QUARTER, LORA_IN_EPILOGUE, HAS_BIAS)
            _epilogue_chunk(q2, xa, b2, y_desc, bias_ptr, seed_ptr, off_m, off_n + 2 * QUARTER, N, drop_threshold,
                            lora_scale, BLOCK_M, QUARTER, LORA_IN_EPILOGUE, HAS_BIAS)
            _epilogue_chunk(q3, xa, b3, y_desc, bias_ptr, seed_ptr, off_m, off_n + 3 * QUARTER, N, drop_threshold,
                            lora_scale, BLOCK_M, QUARTER, LORA_IN_EPILOGUE, HAS_BIAS)


@triton.jit
def _b_chunks(b_desc, off_n, CHUNK_N: tl.constexpr, EPILOGUE_CHUNKS: tl.constexpr):
    """B's (CHUNK_N, R_PAD) chunks of the tile at off_n, zero past N and r, loaded before the tile's
    main loop (their latency hidden behind it; loaded in the epilogue, each chunk waited for its
    own load: NOTES.md #26 a). Chunks past EPILOGUE_CHUNKS repeat the first (never used)."""
    b0 = b_desc.load([off_n, 0])
    b1 = b0
    b2 = b0
    b3 = b0
    if EPILOGUE_CHUNKS > 1:
        b1 = b_desc.load([off_n + CHUNK_N, 0])
    if EPILOGUE_CHUNKS > 2:
        b2 = b_desc.load([off_n + 2 * CHUNK_N, 0])
        b3 = b_desc.load([off_n + 3 * CHUNK_N, 0])
    return b0, b1, b2, b3


@triton.jit
def _operand_tile(desc, off_out, off_red, TRANSPOSED: tl.constexpr):
    """The (reduction, out) tile of a second operand: stored (out, reduction) for the forward
    (W, A, B of x W^T, x A^T, xa B^T) or, TRANSPOSED, stored (reduction, out) for the input
    gradient (W, B, A of g W, g B, (g B) A)."""
    if TRANSPOSED:
        return desc.load([off_red, off_out])
    else:
        return desc.load([off_out, off_red]).T


@triton.jit
def _scaled_up(b_tile, scale, TRANSPOSED: tl.constexpr):
    """The up-projection's (R_PAD, BLOCK_N) tile for the accumulator's last K step. The forward's
    scale goes on B here, not on xa: s xa rounded to float16 overflows from |xa| > 65504 / s where
    the composed path (s applied in float32, addmm's alpha) stays finite; |s B| of adapter weights
    is far from that. The input gradient's LoRA input (s g B, or the given grad_xa) is scaled already.
    Called after the main loop: triton then keeps the tile in registers, 4-8 KiB less shared memory
    than scaling it where it is loaded (sm_90 compiles; NOTES.md #38)."""
    if not TRANSPOSED:
        b_tile = (b_tile.to(tl.float32) * scale).to(b_tile.dtype)
    return b_tile


@triton.jit
def _lora_gemm_kernel(x_desc, w_desc, a_desc, b_desc, y_desc, xa_ptr, xa_pad_ptr, bias_ptr, seed_ptr,
                      M, N, K, R, stride_xa, scale, drop_threshold, keep_scale, cols_per_run, runs_per_row,
                      R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EPILOGUE_CHUNKS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                      POST_DROPOUT: tl.constexpr, TRANSPOSED: tl.constexpr, XA_GIVEN: tl.constexpr,
                      XA_PADDED: tl.constexpr):
    # The same product serves the input gradient (TRANSPOSED, see grad_input): there x is g
    # (M, N_layer), the reduction runs over the layer's outputs and the "xa" it stores is g B.
    # Without dropout the up-projection is one more K step of the tile's own accumulator,
    # acc += xa (s B)^T with K = R_PAD: no second accumulator, no layout change, B's tile loaded
    # before the main loop (the SASS waits for it there too: NOTES.md #38). With 'post' dropout the
    # mask applies to the LoRA term alone, so it is its own product in the epilogue, per chunk,
    # with B's chunks likewise loaded before the main loop. XA_GIVEN (the input gradient with
    # 'post' dropout, grad_input_given_xa): the (M, R) LoRA input is read from xa_ptr, already
    # scaled (s drop(g) B from the masked backward step), instead of computed from the x tiles.
    LORA_IN_ACC: tl.constexpr = HAS_LORA and not POST_DROPOUT
    LORA_IN_EPILOGUE: tl.constexpr = HAS_LORA and POST_DROPOUT
    CHUNK_N: tl.constexpr = BLOCK_N // EPILOGUE_CHUNKS
    run = tl.program_id(0)
    row_block = run // runs_per_row
    off_m = row_block * BLOCK_M
    first_col = (run % runs_per_row) * cols_per_run
    end_col = tl.minimum(first_col + cols_per_run, tl.cdiv(N, BLOCK_N))
    # At least one K step, visibly (K >= 1 anyway; a step past K loads TMA's zero fill): with a
    # possible zero-trip path, triton 3.6 zeroes the accumulators there with plain moves just
    # before the loop's last wgmma wait, and ptxas then serialises every wgmma of the kernel
    # (C7515; the 'post' variant, NOTES.md #33).
    k_tiles = tl.maximum(tl.cdiv(K, BLOCK_K), 1)
    lora_scale = scale * keep_scale  # 'post' dropout: s / (1 - p)

    # The run's first tile: x W^T and, from the same x tiles, x A^T.
    off_n = first_col * BLOCK_N
    if LORA_IN_ACC:
        b_tile = _operand_tile(b_desc, off_n, 0, TRANSPOSED)  # (R_PAD, BLOCK_N), zero past N and r
    if LORA_IN_EPILOGUE:
        b0, b1, b2, b3 = _b_chunks(b_desc, off_n, CHUNK_N, EPILOGUE_CHUNKS)
    else:  # unused
        b0 = 0
        b1 = 0
        b2 = 0
        b3 = 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    xa_acc = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for kt in range(k_tiles):
        x_tile = x_desc.load([off_m, kt * BLOCK_K])
        acc = tl.dot(x_tile, _operand_tile(w_desc, off_n, kt * BLOCK_K, TRANSPOSED), acc)
        if HAS_LORA and not XA_GIVEN:
            xa_acc = tl.dot(x_tile, _operand_tile(a_desc, 0, kt * BLOCK_K, TRANSPOSED), xa_acc)
    # xa in the adapters' dtype, as the composed path rounds it: the LoRA term and the saved
    # xa of backward are the same numbers. The input gradient's g B is rounded scaled, s g B, as
    # the composed path's scaled GEMM rounds it: rounded before scaling, a float16 g B past 65504
    # would be inf where s g B (s < 1) is not. (A given grad_xa comes scaled; scale is 1 then.)
    if TRANSPOSED:
        xa = (xa_acc * scale).to(a_desc.dtype)
    else:
        xa = xa_acc.to(a_desc.dtype)
    if HAS_LORA:
        # Every run of the row block stores its xa (the same bits: same instructions on the
        # same data) and reads it back. The round trip through memory (4 KiB, L2) is on
        # purpose: fed straight from registers into the next MMA, ptxas serialises every
        # wgmma of the kernel, main loop included (warning C7514, sm_90a).
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * r may pass 2**31
        ranks = tl.arange(0, R_PAD)
        xa_ptrs = xa_ptr + rows[:, None] * stride_xa + ranks[None, :]
        xa_mask = (rows[:, None] < M) & (ranks[None, :] < R)
        # XA_PADDED (ranks under 16, i.e. r = 8 where TMA takes B): the round trip goes through a
        # scratch whose rows are R_PAD wide (whole rows, vector stores), and xa's own store reads the
        # reloaded values. Stored straight from the accumulator's registers into xa's 8-wide rows (one
        # 16-bit store per element), the forward compiled with every wgmma of the kernel serialised
        # (ptxas C7514: non-wgmma instructions reading accumulator registers inside a pipeline stage;
        # triton 3.6 and 3.9, sm_90; r = 24 .. 56 were not), and r = 8 measured 15-19 points slower than
        # r = 16 in the forward (benchmarks/NOTES.md #61). The reload always takes xa's own mask: the
        # padding ranks' sums (x A's zero rows: 0, but Inf * 0 = NaN where x holds an Inf) must not
        # reach y through B's zero padding.
        if XA_PADDED:
            trip_ptrs = xa_pad_ptr + rows[:, None] * R_PAD + ranks[None, :]
            trip_mask = rows[:, None] < M
        else:
            trip_ptrs = xa_ptrs
            trip_mask = xa_mask
        if not XA_GIVEN:
            tl.store(trip_ptrs, xa, mask=trip_mask)
            tl.debug_barrier()  # the block's stores are visible to its loads (bar.sync)
        xa = tl.load(trip_ptrs, mask=xa_mask, other=0.0)
        if XA_PADDED:
            tl.store(xa_ptrs, xa, mask=xa_mask)
    if LORA_IN_ACC:
        acc = tl.dot(xa, _scaled_up(b_tile, scale, TRANSPOSED), acc)
    _epilogue(acc, xa, b0, b1, b2, b3, y_desc, bias_ptr, seed_ptr, off_m, off_n, N, drop_threshold, lora_scale,
              BLOCK_M, BLOCK_N, EPILOGUE_CHUNKS, LORA_IN_EPILOGUE, HAS_BIAS)

    for col in range(first_col + 1, end_col):
        off_n = col * BLOCK_N
        if LORA_IN_ACC:
            b_tile = _operand_tile(b_desc, off_n, 0, TRANSPOSED)
        if LORA_IN_EPILOGUE:
            b0, b1, b2, b3 = _b_chunks(b_desc, off_n, CHUNK_N, EPILOGUE_CHUNKS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kt in range(k_tiles):
            acc = tl.dot(x_desc.load([off_m, kt * BLOCK_K]), _operand_tile(w_desc, off_n, kt * BLOCK_K, TRANSPOSED),
                         acc)
        if LORA_IN_ACC:
            acc = tl.dot(xa, _scaled_up(b_tile, scale, TRANSPOSED), acc)
        _epilogue(acc, xa, b0, b1, b2, b3, y_desc, bias_ptr, seed_ptr, off_m, off_n, N, drop_threshold, lora_scale,
                  BLOCK_M, BLOCK_N, EPILOGUE_CHUNKS, LORA_IN_EPILOGUE, HAS_BIAS)


@functools.lru_cache(maxsize=256)  # per layer shape: the search below is a Python loop over column blocks
def runs_per_row(row_blocks: int, col_blocks: int, programs_at_once: int, rank_pad: int, block_n: int) -> int:
    """How many runs to split each row block's column blocks into: the fewest waves of programs
    times the longest run (in tiles, its first tile counted r/BLOCK_N longer for x A^T); ties go
    to fewer runs (less recomputation of xa)."""
    best, best_cost = 1, None
    for runs in range(1, col_blocks + 1):
        cols = -(-col_blocks // runs)
        if -(-col_blocks // cols) != runs:  # same schedule as a smaller split
            continue
        waves = -(-(row_blocks * runs) // programs_at_once)
        cost = waves * (cols + rank_pad / block_n)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = runs, cost
    return best


def _aligned(t: torch.Tensor) -> bool:
    """TMA-addressable rows: unit last stride, 16-byte aligned base and row stride, and rows that do
    not overlap (an expanded tensor's row stride 0 is not a tensor map's, and TMA would not repeat)."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def _operands_supported(a2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """One 16-bit dtype on one device, TMA-addressable (2-D, unit last stride, 16-byte aligned
    base and rows), 1 <= r <= 64, nothing empty, sizes within the kernel's int32 coordinates."""
    dtype = a2.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if any(t.dtype != dtype or t.device != a2.device for t in (weight, lora_A, lora_B)):
        return False
    if lora_A.shape[0] > MAX_FUSED_RANK or min(lora_A.shape[0], a2.shape[0], *weight.shape) == 0:
        return False
    if max(a2.shape[0], *weight.shape) >= 2**31:  # the kernel's tile coordinates are int32
        return False
    return all(_aligned(t) for t in (a2, weight, lora_A, lora_B))


def layout_supported(x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether TMA can address these tensors and the kernel computes this call: one 16-bit dtype
    for x, W, A, B on one device, 2-D with unit last stride, 16-byte aligned base and rows
    (K, N and r multiples of 8), 1 <= r <= 64, nothing empty. Independent of the device kind,
    so the CPU tests check it too."""
    if weight is None or x2.shape[1] != weight.shape[1]:
        return False
    if bias is not None and (bias.device != x2.device or bias.dim() != 1 or bias.stride(0) != 1):
        return False
    return _operands_supported(x2, weight, lora_A, lora_B) and (weight.shape[0] * x2.element_size()) % 16 == 0


def grad_input_layout_supported(grad_y2: torch.Tensor, weight: torch.Tensor | None, lora_A: torch.Tensor,
                                lora_B: torch.Tensor) -> bool:
    """layout_supported for grad_input: g (M, N) in x's place, dx (M, K) the output."""
    if weight is None or grad_y2.dim() != 2 or grad_y2.shape[1] != weight.shape[0]:
        return False
    return _operands_supported(grad_y2, weight, lora_A, lora_B) and (weight.shape[1] * weight.element_size()) % 16 == 0


def _on_hopper(t: torch.Tensor) -> bool:
    """CUDA sm_90 or newer (TMA), and a triton with host-side tensor descriptors."""
    return TensorDescriptor is not None and t.is_cuda and device_facts.major_capability(t.device) >= 9


def supports(x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, lora_A: torch.Tensor,
             lora_B: torch.Tensor) -> bool:
    """Whether the fused forward can compute this call on the GPU: `_on_hopper` and `layout_supported`."""
    return _on_hopper(x2) and layout_supported(x2, weight, bias, lora_A, lora_B)


def grad_input_supports(grad_y2: torch.Tensor, weight: torch.Tensor | None, lora_A: torch.Tensor,
                        lora_B: torch.Tensor) -> bool:
    """Whether grad_input can compute this call on the GPU."""
    return _on_hopper(grad_y2) and grad_input_layout_supported(grad_y2, weight, lora_A, lora_B)


def grad_input_given_xa_layout_supported(grad_y2: torch.Tensor, weight: torch.Tensor | None, lora_A: torch.Tensor,
                                         lora_B: torch.Tensor, grad_xa: torch.Tensor) -> bool:
    """grad_input_layout_supported, and grad_xa (M, r) in the adapters' dtype on their device with
    unit last stride (the kernel reads its rows through pointers)."""
    return (grad_input_layout_supported(grad_y2, weight, lora_A, lora_B) and grad_xa.dim() == 2
            and tuple(grad_xa.shape) == (grad_y2.shape[0], lora_A.shape[0]) and grad_xa.dtype == lora_A.dtype
            and grad_xa.device == lora_A.device and grad_xa.stride(1) == 1)


def grad_input_given_xa_supports(grad_y2: torch.Tensor, weight: torch.Tensor | None, lora_A: torch.Tensor,
                                 lora_B: torch.Tensor, grad_xa: torch.Tensor) -> bool:
    """Whether grad_input_given_xa can compute this call on the GPU."""
    return _on_hopper(grad_y2) and grad_input_given_xa_layout_supported(grad_y2, weight, lora_A, lora_B, grad_xa)


# The tiles of both GEMMs; the pipeline's stages come from _pipeline_stages.
DEFAULT_CONFIG = dict(block_m=128, block_n=256, block_k=64, epilogue_chunks=4, num_warps=8)


def _pipeline_stages(layer_out_features: int, r: int) -> int:
    """Pipeline stages for a k/v-sized layer (N <= 2048 outputs) at r <= 16: 4, else 3.

    Measured on the H200 at 4096 x 1024 (M = 8192, r = 16, ratios to cuBLAS; benchmarks/NOTES.md #26,
    #28, #30), a 4th stage helped every form of the kernel there: Triton's GEMM alone 1.03 and 1.03
    against 1.08 and 1.20 with 3 stages (two runs), the fused forward 1.19 against 1.24, its first
    cut 1.36 against 1.46, Triton's GEMM in the input gradient's layout 1.11 twice against 1.11 and
    1.53. At 4096 x 4096 it lost (fused forward 1.29 against 1.24). The rank bounds it by shared
    memory: with r padded past 16, four stages need more than the 227 KiB a block may use (262 KB
    at r = 64)."""
    return 4 if layer_out_features <= 2048 and r <= 16 else 3


# The "SM count" the launch rules assume for CPU tensors (the Triton interpreter), where any split is
# correct: a few programs, so that the tests' small shapes take the split paths.
INTERPRETER_PROGRAMS = 4

# Few rows (decode, small batches): up to this many, linear_forward takes small_m_config's tiles.
SMALL_M_MAX_ROWS = 64
# The shared memory small_m_config lets its pipeline stages take (of the 227 KiB a block may use on
# Hopper; the B tile and the epilogue's y tile come on top).
_SMALL_M_STAGE_BUDGET = 160 * 1024


def small_m_config(M: int, N: int, r: int, programs: int) -> dict:
    """Tiles for the forward of few rows (M <= SMALL_M_MAX_ROWS; benchmarks/NOTES.md #44).

    There the base product is a GEMV-like stream of W (qo: 32 MiB at M = 16, 2 MFLOP per KiB
    of W is nothing for the tensor cores), and the call is host-bound on the H200 at qo and k/v
    (a composed forward pays cuBLAS's host path, ~15 us there, on top of the LoRA term's launch).
    One launch of this kernel does x W^T, x A^T and the LoRA term with one host path. So: one
    row block (BLOCK_M = M rounded up to a power of two, at least the 16 rows of an mma.sync),
    and enough column blocks for about one program per SM (`programs`): BLOCK_N = N / programs
    rounded up to a power of two within 16 .. 128 (H200: 32 at 4096 outputs, 16 at 1024, 128 at
    14336). Every run recomputes x A^T from L2 (x and A: (M + r) K elements against the run's
    BLOCK_N K of W), which is why BLOCK_N does not go below 16. A long K step (256 where
    BLOCK_N and the padded rank are <= 32) keeps more of W in flight per program: a stage of W
    is 16 KiB at 32 x 256. Past that A's tile would crowd W's out of the stages (r = 64: 32 KiB
    of A per 256-wide step, two stages). Stages: as many as fit _SMALL_M_STAGE_BUDGET, 2 to 4.
    Four warps: at 16 rows the products are mma.sync tiles, not wgmma's 64-row ones."""
    block_m = max(16, triton.next_power_of_2(M))
    block_n = min(128, max(16, triton.next_power_of_2(triton.cdiv(N, max(programs, 1)))))
    rank_pad = max(16, triton.next_power_of_2(r))
    block_k = 256 if block_n <= 32 and rank_pad <= 32 else 128
    stage_bytes = 2 * block_k * (block_m + block_n + rank_pad)  # x, W and A tiles, 16-bit
    num_stages = max(2, min(4, _SMALL_M_STAGE_BUDGET // stage_bytes))
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, epilogue_chunks=1, num_warps=4,
                num_stages=num_stages)


def linear_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                   *, has_lora: bool = True, runs: int | None = None, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) for x2 (M, K): y = x2 W^T + b + drop_post(s xa B^T), xa = x2 A^T (see the module doc).
    Up to SMALL_M_MAX_ROWS rows with small_m_config's tiles, else DEFAULT_CONFIG's.
    `config` overrides those (block sizes, stages, warps) and `runs` the split of
    each row block's column blocks; both for the benchmarks' sweeps."""
    if x2.shape[0] <= SMALL_M_MAX_ROWS:
        tiles = small_m_config(x2.shape[0], weight.shape[0], lora_A.shape[0],
                               device_facts.sm_count(x2.device, on_cpu=INTERPRETER_PROGRAMS))
    else:
        tiles = {"num_stages": _pipeline_stages(weight.shape[0], lora_A.shape[0])}
    config = {**tiles, **config}
    return _launch(x2, weight, lora_A, lora_B, bias, scale, dropout_p, seed, has_lora, runs, False, None, config)


def grad_input(grad_y2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scale: float, *, has_lora: bool = True, runs: int | None = None,
               **config) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, s g B) for the dropout-free backward, grad_y2 = g (M, N): dx = g W + (s g B) A as one GEMM
    of the same kernel (the reduction runs over N; g B from the g tiles the base product loads,
    the LoRA term one more K step), and grad_xa = s g B (M, r) in the adapters' dtype, rounded once
    as the composed path's: the caller's dA = grad_xa^T x. Same requirements as linear_forward
    (`grad_input_supports`)."""
    config = {"num_stages": _pipeline_stages(weight.shape[0], lora_A.shape[0]), **config}
    return _launch(grad_y2, weight, lora_B, lora_A, None, scale, 0.0, None, has_lora, runs, True, None, config)


def grad_input_given_xa(grad_y2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        grad_xa: torch.Tensor, *, runs: int | None = None, **config) -> torch.Tensor:
    """dx = g W + grad_xa A as one GEMM for grad_y2 = g (M, N), with grad_xa (M, r) given: the input
    gradient with 'post' dropout, where grad_xa = s drop(g) B comes from the masked backward step
    (csrc/cuda/masked_grad_y.cu), or without dropout, where grad_xa = s g B is formed for dA anyway
    (NOTES.md #76, #91, #95); only the base product reads g. Saves the composed path's
    (M, K) write of grad_xa A and the base GEMM's beta = 1 read of it (NOTES.md #34). lora_B only
    shapes an unused descriptor. Requirements: grad_input_given_xa_supports."""
    config = {"num_stages": _pipeline_stages(weight.shape[0], lora_A.shape[0]), **config}
    return _launch(grad_y2, weight, lora_B, lora_A, None, 1.0, 0.0, None, True, runs, True, grad_xa, config)[0]


def _launch(a2, weight, down, up, bias, scale, dropout_p, seed, has_lora, runs, transposed, given_xa, config):
    """One launch of _lora_gemm_kernel: out = a2 W' + b + drop_post(s (a2 D') U'), and a2 D' (s a2 D'
    when transposed), where W', D', U' are weight, down, up transposed for the forward (transposed=False:
    stored (out, reduction)) and as stored for the input gradient (transposed=True); with given_xa
    (M, r) and s = 1, out = a2 W' + given_xa U' and given_xa is returned in a2 D''s place."""
    cfg = {**DEFAULT_CONFIG, **config}
    block_m, block_n, block_k, chunks = cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["epilogue_chunks"]
    M, K = a2.shape
    N = weight.shape[1] if transposed else weight.shape[0]
    r = down.shape[1] if transposed else down.shape[0]
    rank_pad = max(16, triton.next_power_of_2(r))
    y = torch.empty((M, N), device=a2.device, dtype=a2.dtype)
    xa = torch.empty((M, r), device=a2.device, dtype=down.dtype) if given_xa is None else given_xa
    # The forward's xa round trip through rows of the padded rank at ranks under 16 (see the kernel): an
    # (M, 16) temporary of the call, 256 KiB at M = 8192, r = 8. Not in the input gradient, whose r = 8
    # variant keeps its wgmmas in flight without it, nor at r = 24 .. 56, whose forward does too
    # (scripts/sweep_fused_compile.py).
    xa_pad = (torch.empty((M, rank_pad), device=a2.device, dtype=down.dtype)
              if has_lora and given_xa is None and not transposed and r < 16 else None)
    row_blocks, col_blocks = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    if runs is None:
        programs = device_facts.sm_count(a2.device, on_cpu=INTERPRETER_PROGRAMS)
        runs = runs_per_row(row_blocks, col_blocks, programs, rank_pad, block_n)
    cols_per_run = triton.cdiv(col_blocks, runs)
    runs = triton.cdiv(col_blocks, cols_per_run)
    chunk_n = block_n // chunks
    post_dropout = has_lora and dropout_p > 0.0
    assert not (post_dropout and transposed), "the input gradient is computed without dropout only"

    def operand(t, out_block, red_block):
        """The descriptor of a second operand, blocks of (out_block, red_block) in its own layout."""
        return TensorDescriptor.from_tensor(t, [red_block, out_block] if transposed else [out_block, red_block])

    def variant():
        """What the compiled kernel's resources depend on: a variant that did not fit this device
        once is refused without loading it again (the load is what fails, on every call)."""
        return (a2.device, a2.dtype, transposed, has_lora, post_dropout, bias is not None, rank_pad,
                given_xa is not None, xa_pad is not None, tuple(sorted(cfg.items())))

    if _DOES_NOT_FIT:  # empty on a GPU where every variant fits: no key built per call
        refused = _DOES_NOT_FIT.get(variant())
        if refused is not None:
            raise refused.with_traceback(None)  # the first failure's error, without piling up tracebacks
    try:
        # Through replay.launch: the native path records this launch and replays it from C++.
        replay.launch(
            _lora_gemm_kernel, (row_blocks * runs,),
            TensorDescriptor.from_tensor(a2, [block_m, block_k]),
            operand(weight, block_n, block_k),
            operand(down, rank_pad, block_k),
            # The up-projection's block: the whole tile's columns when the LoRA term joins the
            # accumulator, an epilogue chunk's when it is a product of its own ('post' dropout).
            operand(up, chunk_n if post_dropout else block_n, rank_pad),
            TensorDescriptor.from_tensor(y, [block_m, chunk_n]),
            xa, xa_pad if xa_pad is not None else xa, bias if bias is not None else y, seed if post_dropout else xa,
            M, N, K, r, xa.stride(0), float(scale), dropout_threshold(dropout_p) if post_dropout else 0,
            1.0 / (1.0 - dropout_p), cols_per_run, runs,
            R_PAD=rank_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EPILOGUE_CHUNKS=chunks,
            HAS_LORA=has_lora, HAS_BIAS=bias is not None, POST_DROPOUT=post_dropout,
            TRANSPOSED=transposed, XA_GIVEN=given_xa is not None, XA_PADDED=xa_pad is not None,
            num_stages=cfg["num_stages"], num_warps=cfg["num_warps"],
        )
    except OutOfResources as error:
        _DOES_NOT_FIT[variant()] = error
        raise
    return y, xa


# Compiled variants of _lora_gemm_kernel that need more than the device has (shared memory,
# registers), by what decides it; see _launch.
_DOES_NOT_FIT: dict[tuple, OutOfResources] = {}


def unless_out_of_resources(run):
    """run(), or None where the fused kernel does not fit the GPU (a block's shared memory: the
    configurations are sized for Hopper's 227 KiB; GPUs of a later major version may have less).
    The callers then compose the product from other kernels, as for a layout `supports` refuses."""
    try:
        return run()
    except OutOfResources:
        return None
