"""The rank hint of the thin kernels (adapter_grads.py, triton_lora.py; benchmarks/NOTES.md #63, #66).

At r = 8 (24, 40, 56) an (M, r) operand's rows are 16 bytes in 16-bit, but triton's launch marks only
integers divisible by 16 (and none of the do_not_specialize ones), so the compiled kernels loaded such rows
one 2-byte element per instruction. The host finds where r and the row strides are all multiples of 8
(rank_alignment) and passes that as a constexpr; the kernels write the strides and the rank mask so that
triton's analysis sees the multiple (aligned_stride, rank_mask): the same values, 16-byte vector loads.
"""
from __future__ import annotations

import triton
import triton.language as tl


def rank_alignment(r: int, *row_strides: int) -> int:
    """8 where r and the row strides of the (M, r) operands are all multiples of 8 but not all of 16
    (triton's launch marks multiples of 16 itself), else 1: the RANK_ALIGN hint of the kernels (adapter_grads.py,
    triton_lora.py). Row strides, not tensors: triton_lora's launchers also pass Bᵀ's column stride and
    the slice stride of a float32 partial buffer, which would take a view per call (host time)."""
    sizes = (r, *row_strides)
    return 8 if all(n % 8 == 0 for n in sizes) and not all(n % 16 == 0 for n in sizes) else 1


@triton.jit
def aligned_stride(stride, ALIGN: tl.constexpr):
    """stride, written as (stride // ALIGN) * ALIGN where ALIGN > 1: the rank hint (RANK_ALIGN, from
    rank_alignment). The same value (the host checked that ALIGN divides it), written so that triton's
    analysis sees the multiple: rows of 8 ranks are 16 bytes in 16-bit, loaded 16 bytes at a time. Triton's
    launch marks only multiples of 16 (tl.multiple_of on these scalars changed nothing, triton 3.9): at r = 8
    the adapter-gradient kernel's small tile was 64 synchronous 2-byte loads per thread and tile
    (LDG.E.U16, sm_90 SASS), and its launch took 77.6 us at 4096 x 1024 against 40.8 with the hint (H100;
    benchmarks/NOTES.md #63)."""
    if ALIGN > 1:
        stride = (stride // ALIGN) * ALIGN
    return stride


@triton.jit
def rank_mask(ranks, R, RANK_ALIGN: tl.constexpr):
    """ranks < R, written as ranks // RANK_ALIGN < R // RANK_ALIGN where RANK_ALIGN > 1 divides R (the rank
    hint, as aligned_stride): the mask is then constant over each group of RANK_ALIGN ranks, which the
    vector loads need."""
    if RANK_ALIGN > 1:
        return (ranks // RANK_ALIGN) < (R // RANK_ALIGN)
    else:
        return ranks < R
