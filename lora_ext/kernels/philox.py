"""The dropout mask of every lora backend, as Triton device functions.

Element `index` (the row-major linear index into the M x C tensor being dropped) is kept iff

    half(index % 2) of philox4(seed, index // 8)[(index // 2) % 4] >= floor(p * 2**16)

where philox4 gives the four output words of Philox-4x32-10 with counter
(lo32(c), hi32(c), 0, 0) and key (lo32(seed), hi32(seed)), and half 0 / 1 is a word's low /
high 16 bits: eight consecutive elements share one evaluation. This is csrc/philox.h, bit for
bit. It is written out here instead of calling tl.randint4x because how tl.randint splits an
int64 offset into the counter has changed between triton versions; the mask must not depend
on the installed triton. Kernels whose tile rows hold whole groups (C % 8 == 0) evaluate one
Philox per group or half group (`dropout_keep_tile`); otherwise each element evaluates its own
group's (`dropout_keep`). Where the mask meets a tensor-core accumulator (the fused GEMM's
epilogue), `dropout_keep_bits` packs a group's eight keep bits into one integer, one Philox
evaluation per group, and `keep_from_bits` spreads them over the tile in the accumulator's layout.

`dropout_keep_mask` materialises the mask with a small kernel: the float64 fallback of
triton_lora.py uses it (a temporary, never saved), and the tests compare it with
lora_ext.reference.dropout_keep_mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# floor(p * 2**16), as csrc/philox.h: one definition for the Python side (the numpy reference's).
from ..reference import dropout_threshold

# Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
# All four are >= 2**31, so Triton types them uint32, like the counter words. (Globals
# read by @triton.jit code must be tl.constexpr instances, not annotations.)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)


@triton.jit
def load_seed_words(seed_ptr):
    """The Philox key (lo32(seed), hi32(seed)) of the int64 seed stored at seed_ptr.

    Read on the device so that no host sync is needed (CUDA graphs, torch.compile).
    """
    seed = tl.load(seed_ptr)
    # int64 -> uint32 keeps the low 32 bits; for the high word an arithmetic shift of a
    # negative seed leaves the same low 32 bits as the logical shift of philox.h.
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def philox4(key_lo, key_hi, counter_lo, counter_hi):
    """The four output words of Philox-4x32-10 for counter (counter_lo, counter_hi, 0, 0).

    All arguments are uint32 (the counters a block, the key scalars). Each 32 x 32-bit
    product is formed once as a uint64 (hi and lo word from one wide multiply, which the
    GPU does in one instruction); the key schedule adds in uint64 and keeps the low word.
    Neither wraps a 32-bit integer, so Triton's overflow sanitizer (on in the
    interpreter) has nothing to check.
    """
    c0 = counter_lo
    c1 = counter_hi
    c2 = counter_lo * 0
    c3 = counter_lo * 0
    k0 = key_lo
    k1 = key_hi
    for _ in tl.static_range(10):
        product_b = c2.to(tl.uint64) * PHILOX_ROUND_B
        product_a = c0.to(tl.uint64) * PHILOX_ROUND_A
        c0 = (product_b >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (product_a >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = product_b.to(tl.uint32)
        c3 = product_a.to(tl.uint32)
        k0 = (k0.to(tl.uint64) + PHILOX_KEY_A).to(tl.uint32)
        k1 = (k1.to(tl.uint64) + PHILOX_KEY_B).to(tl.uint32)
    return c0, c1, c2, c3


# Elements per Philox evaluation (csrc/philox.h kMaskGroup).
MASK_GROUP = tl.constexpr(8)


@triton.jit
def _halves_kept(word, threshold):
    """(low half kept, high half kept) of a uint32 word: the even and the odd element."""
    return (word & 0xFFFF).to(tl.int32) >= threshold, (word >> 16).to(tl.int32) >= threshold


@triton.jit
def dropout_keep(key_lo, key_hi, index, threshold):
    """True where the element at int64 linear `index` survives dropout with the given
    threshold (floor(p * 2**16), an int32 scalar)."""
    group = index >> 3
    c0, c1, c2, c3 = philox4(key_lo, key_hi, group.to(tl.uint32), (group >> 32).to(tl.uint32))
    lane = (index >> 1) & 3
    word = tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))
    half = tl.where((index & 1) == 0, word & 0xFFFF, word >> 16)
    return half.to(tl.int32) >= threshold


@triton.jit
def _tile_group_words(key_lo, key_hi, m, c_first, C, BLOCK_C: tl.constexpr):
    """philox4's four words for each group of eight of the tile's rows m and columns c_first ..
    c_first + BLOCK_C - 1 (C % 8 == 0): (BLOCK_M, BLOCK_C // 8) each."""
    group = (m[:, None] * C + c_first + MASK_GROUP * tl.arange(0, BLOCK_C // MASK_GROUP)[None, :]) >> 3
    return philox4(key_lo, key_hi, group.to(tl.uint32), (group >> 32).to(tl.uint32))


@triton.jit
def dropout_keep_tile(key_lo, key_hi, m, c_first, C, threshold, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      GROUP_COLUMNS: tl.constexpr):
    """dropout_keep for the (BLOCK_M, BLOCK_C) tile of rows m (int64) and columns c_first ..
    c_first + BLOCK_C - 1 of a row-major M x C tensor (c_first a multiple of BLOCK_C, itself of 8).

    GROUP_COLUMNS = 8 (C % 8 == 0): each group of eight consecutive elements lies in one row of
    the tile, so one Philox evaluation per group gives the masks of its eight elements (an
    eighth of the work of evaluating per element). Spreading a group's eight bits over the tile
    takes three nested joins, which Triton lowers through shared memory when a thread of the
    tile's layout holds fewer than eight elements: then
    GROUP_COLUMNS = 4 (C % 4 == 0): each half group of four elements evaluates its group's Philox
    and takes two of its words (two joins; a quarter of the work of evaluating per element).
    GROUP_COLUMNS = 0: groups straddle rows and each element evaluates its own group.
    """
    if GROUP_COLUMNS == 8:
        c0, c1, c2, c3 = _tile_group_words(key_lo, key_hi, m, c_first, C, BLOCK_C)
        lo0, hi0 = _halves_kept(c0, threshold)
        lo1, hi1 = _halves_kept(c1, threshold)
        lo2, hi2 = _halves_kept(c2, threshold)
        lo3, hi3 = _halves_kept(c3, threshold)
        # (BLOCK_M, BLOCK_C // 8, 2, 2, 2) with [.., a, b, h] = half h of word 2a + b (each join
        # adds the new last dimension), so that the row-major reshape puts element k of group j,
        # half k % 2 of word k // 2, at column 8j + k.
        keep = tl.join(tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3)),
                       tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3)))
        return tl.reshape(keep, (BLOCK_M, BLOCK_C))
    elif GROUP_COLUMNS == 4:
        half_group = (m[:, None] * C + c_first + 4 * tl.arange(0, BLOCK_C // 4)[None, :]) >> 2
        group = half_group >> 1
        c0, c1, c2, c3 = philox4(key_lo, key_hi, group.to(tl.uint32), (group >> 32).to(tl.uint32))
        # Elements 0-3 of a group take words 0 and 1, elements 4-7 words 2 and 3.
        second = (half_group & 1) == 1
        lo_a, hi_a = _halves_kept(tl.where(second, c2, c0), threshold)
        lo_b, hi_b = _halves_kept(tl.where(second, c3, c1), threshold)
        # (BLOCK_M, BLOCK_C // 4, 2, 2) with [.., w, h] = half h of word w: column 4j + 2w + h.
        keep = tl.join(tl.join(lo_a, lo_b), tl.join(hi_a, hi_b))
        return tl.reshape(keep, (BLOCK_M, BLOCK_C))
    else:
        c = c_first + tl.arange(0, BLOCK_C)
        return dropout_keep(key_lo, key_hi, m[:, None] * C + c[None, :], threshold)


@triton.jit
def dropout_keep_bits(key_lo, key_hi, m, c_first, C, threshold, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The keep mask of the (BLOCK_M, BLOCK_C) tile as in dropout_keep_tile (C % 8 == 0), packed:
    (BLOCK_M, BLOCK_C // 8) int32, bit k of [i, j] set iff element (m[i], c_first + 8 j + k) is kept.
    The keys may be scalars or tensors of the packed shape (fused_forward pins the layout with them)."""
    c0, c1, c2, c3 = _tile_group_words(key_lo, key_hi, m, c_first, C, BLOCK_C)
    bits = _word_bits(c0, threshold)
    bits |= _word_bits(c1, threshold) << 2
    bits |= _word_bits(c2, threshold) << 4
    bits |= _word_bits(c3, threshold) << 6
    return bits


@triton.jit
def _word_bits(word, threshold):
    """Bit 0: the low half of word kept; bit 1: the high half."""
    lo, hi = _halves_kept(word, threshold)
    return lo.to(tl.int32) | (hi.to(tl.int32) << 1)


@triton.jit
def keep_from_bits(bits, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_M, BLOCK_C) boolean mask of dropout_keep_bits' packed (BLOCK_M, BLOCK_C // 8) bits."""
    spread = tl.reshape(tl.broadcast_to(bits[:, :, None], (BLOCK_M, BLOCK_C // 8, 8)), (BLOCK_M, BLOCK_C))
    return ((spread >> (tl.arange(0, BLOCK_C) % 8)[None, :]) & 1) != 0


@triton.jit
def _keep_mask_kernel(out_ptr, seed_ptr, first_index, numel, threshold, BLOCK: tl.constexpr):
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key_lo, key_hi = load_seed_words(seed_ptr)
    keep = dropout_keep(key_lo, key_hi, first_index + offset, threshold)
    tl.store(out_ptr + offset, keep.to(tl.uint8), mask=offset < numel)


def keep_mask_range(seed: torch.Tensor, first_index: int, numel: int, p: float) -> torch.Tensor:
    """Boolean keep-mask of the linear indices first_index .. first_index + numel - 1."""
    out = torch.empty((numel,), dtype=torch.uint8, device=seed.device)
    if numel > 0:
        block = 1024
        grid = (-(-numel // block),)
        _keep_mask_kernel[grid](out, seed, first_index, numel, dropout_threshold(p), BLOCK=block)
    return out.view(torch.bool)


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """Boolean (rows, cols) keep-mask on seed's device, element (i, j) at index i * cols + j."""
    return keep_mask_range(seed, 0, rows * cols, p).view(rows, cols)
