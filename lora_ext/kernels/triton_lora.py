"""Triton implementation of lora::linear and lora::linear_backward (SPEC.md section 1).

The base GEMMs (x W^T, dY W, dY^T x) stay on cuBLAS through torch; the Triton kernels
make the rank-r LoRA path cheap and never write anything of activation size except
the op's own outputs. With x2 = x as (M, K), g = dY as (M, N), s = scale:

  forward    xa = drop_pre(x2) A^T                  _lora_down_kernel  (one pass over x)
             y  = b + drop_post(s xa B^T)           _lora_up_kernel    (writes y once)
             y += x2 W^T                            torch addmm_ (beta=1: cuBLAS adds y in its epilogue)
  backward   dxa = s drop_post(g) B,
             dB  = s drop_post(g)^T xa              _lora_down_reduce_kernel  (one pass over g for both)
             dx  = drop_pre(dxa A),
             dA  = dxa^T drop_pre(x2)               _lora_up_kernel    (one pass over x for both)
             dx += g W                              torch addmm_
             dW  = g^T x2, db = sum_rows(g)         torch

On Hopper, a dropout-free forward from FUSED_FORWARD_MIN_ROWS tokens is one GEMM instead
(fused_forward.py: x W^T, x A^T and the LoRA term in one Triton kernel over TMA tiles); so is a
'post' dropout forward where fused_post_forward_takes_width (K <= 4096, or <= 8192 at N <= 2048) when
lora_ext._C.set_fused_post_dropout(True) (the default; measured, benchmarks/NOTES.md #39).

Dropout masks are generated in the kernels from the seed tensor (lora_ext/kernels/philox.py)
and regenerated in backward; no mask and no dropped copy is written. Reductions whose
output is small (xa/dxa over a long row when M is small, dB and dA over M) are split
across programs into float32 partials, which `_sum_partials_kernel` adds in a fixed
order: results are deterministic (no atomics).

The LoRA path runs in lora_A's dtype with float32 accumulation; y and grad_x are
written in x's dtype. float64 (gradcheck) does not go through tl.dot: any call with
a float64 x or adapters, or a rank above MAX_KERNEL_RANK (256), runs
`_composite_forward` / `_composite_backward`, the torch composition of
csrc/lora_aten.cpp, with the dropout mask from philox.py (a temporary of the call).

All functions also run on CPU tensors under TRITON_INTERPRET=1 (set before triton is
imported); the interpreter gets small blocks so the tests exercise every split.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _C, ops
from . import device_facts, fused_forward, replay
from .rank_hint import aligned_stride, rank_alignment, rank_mask
from .philox import dropout_keep_mask, dropout_keep_tile, dropout_threshold, load_seed_words

# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


# Row counts, loop counts and the partial buffers' strides are not specialised: Triton would
# otherwise compile a variant for each value equal to 1 or divisible by 16 (e.g. direct
# output vs float32 partials). C and R are, like the strides of x, dY, y, dx, xa and the
# adapters: a tile's column mask (c < C, r < R) must be known constant over 8 columns for
# its loads to be 16-byte vectors (and cp.async-pipelined). With C unspecialised the
# masked pieces loaded dY / x one bf16 element per instruction (SASS, sm_90; NOTES #19).
_SIZE_ARGS = ["M", "drop_threshold"]

# RANK_ALIGN and PANEL_ALIGN (rank_hint.py, from the launchers' _rank_hints): 8 where r and the row strides of
# the operands whose ranks are contiguous are multiples of 8 but not all of 16, else 1. RANK_ALIGN covers xa /
# dxa (rows) in _lora_down_reduce_kernel and _lora_up_kernel and out (xa / dxa, or its float32 partials) in
# _lora_down_kernel, and sets the rank mask; PANEL_ALIGN the panel where it is B (B's rows, Bᵀ's columns; 1 for
# A). Triton's launch marks only multiples of 16, and none of the do_not_specialize strides: at r = 8 these
# operands were loaded one 2-byte element per instruction (sm_90 SASS, the counts in benchmarks/NOTES.md #66), as
# in the adapter-gradient kernel, whose launch that made ~2x slower at r = 8 (NOTES.md #63); with the hint the
# 'post' backward's pass over dY measured 3-6% faster at r = 8 (#66). At r = 16 the hints are 1 and the kernels
# compile as before. Not hinted: the float32 partials of _lora_down_reduce_kernel (with them ptxas spilled at
# r = 40 and 56) and the dA store of _lora_up_kernel ((r, K) rows: its row stride K, not r); nor ranks past
# _RANK_HINT_MAX_RANK (see there).
_RANK_HINT_MAX_RANK = 128


def _rank_hints(r: int, row_strides, panel: torch.Tensor, panel_ranks_dim: int) -> tuple[int, int]:
    """(RANK_ALIGN, PANEL_ALIGN) of a launch: the first from r and the row strides of the (M, r) operands, the
    second from the panel's stride across its ranks where they are contiguous (stride 1 along panel_ranks_dim:
    B's rows, Bᵀ's columns), else 1. Each hint holds for exactly the strides its kernel rewrites. Past
    _RANK_HINT_MAX_RANK both are 1: at r_pad = 256 with 'post' dropout the hinted pass over dY compiled with
    register spills (28 local accesses at r = 136, none without the hint; sm_90, triton 3.9), not measured."""
    if r > _RANK_HINT_MAX_RANK:
        return 1, 1
    ranks_contiguous = panel.stride(panel_ranks_dim) == 1
    panel_align = rank_alignment(r, panel.stride(1 - panel_ranks_dim)) if ranks_contiguous else 1
    return rank_alignment(r, *row_strides), panel_align


@triton.jit
def _program_blocks(M, C, blocks_m_per_group, blocks_c_per_group, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (i, j)'s m-blocks [mb_start, mb_end) (group i) and c-blocks [cb_start, cb_end)
    (group j), and the int64 index of its first row and first column: m * stride and m * C may
    pass 2**31 (the loop counters stay int32 and only count blocks within the program)."""
    mb_start = tl.program_id(0) * blocks_m_per_group
    mb_end = tl.minimum(mb_start + blocks_m_per_group, tl.cdiv(M, BLOCK_M))
    cb_start = tl.program_id(1) * blocks_c_per_group
    cb_end = tl.minimum(cb_start + blocks_c_per_group, tl.cdiv(C, BLOCK_C))
    return mb_start, mb_end, cb_start, cb_end, mb_start.to(tl.int64) * BLOCK_M, cb_start.to(tl.int64) * BLOCK_C


@triton.jit
def _dropout_key(seed_ptr, DROPOUT: tl.constexpr):
    """The Philox key from the seed tensor; placeholders (unused) without dropout."""
    key_lo = 0
    key_hi = 0
    if DROPOUT:
        key_lo, key_hi = load_seed_words(seed_ptr)
    return key_lo, key_hi


@triton.jit
def _load_dropped_tile(inp_ptr, m, c, m_ok, c_ok, stride_im, stride_ic, c_tile, C,
                       key_lo, key_hi, drop_threshold, keep_scale,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr,
                       GROUP_COLUMNS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """The (BLOCK_M, BLOCK_C) tile inp[m, c] as dot operand, dropped out (mask index m * C + c)
    and its kept values times keep_scale when DROPOUT; zero outside the matrix."""
    inp = tl.load(inp_ptr + m[:, None] * stride_im + c[None, :] * stride_ic,
                  mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    if DROPOUT:
        keep = dropout_keep_tile(key_lo, key_hi, m, c_tile, C, drop_threshold, BLOCK_M, BLOCK_C, GROUP_COLUMNS)
        # Times 0, not replaced by 0: a dropped NaN/Inf stays NaN (torch dropout, the reference).
        inp = inp.to(tl.float32) * tl.where(keep, keep_scale, 0.0)
    return inp.to(COMPUTE_DTYPE)


@triton.jit(do_not_specialize=_SIZE_ARGS + ["stride_os", "stride_om", "blocks_m_per_group", "blocks_c_per_group"])
def _lora_down_kernel(
    inp_ptr, panel_ptr, out_ptr, seed_ptr,
    M, C, R,
    stride_im, stride_ic,
    stride_pc, stride_pr,
    stride_os, stride_om, stride_or,
    blocks_m_per_group, blocks_c_per_group,
    out_scale, drop_threshold, keep_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    GROUP_COLUMNS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    RANK_ALIGN: tl.constexpr, PANEL_ALIGN: tl.constexpr,
):
    """out[m, :] = out_scale * drop(inp)[m, :] @ panel: one pass over inp (M x C) contracting it
    with panel (C x R) into M x R.

    Program (i, j) covers the m-blocks of group i and the c-blocks of group j, c-blocks
    innermost, so an m-block's out rows are accumulated in registers. Its out is a partial
    over its c-range, written to slice j of out (stride_os; the launcher sums the slices
    when there is more than one).
    forward: inp = x, panel = A^T, out = xa.  backward: inp = dY, panel = B, out = dxa / s.
    """
    pid_c_group = tl.program_id(1)  # the slice of out this program writes (_program_blocks reads both ids)
    mb_start, mb_end, cb_start, cb_end, m_first, c_first = _program_blocks(
        M, C, blocks_m_per_group, blocks_c_per_group, BLOCK_M, BLOCK_C)
    r = tl.arange(0, R_PAD).to(tl.int64)  # 64-bit: r * stride passes 2^31 for a strided adapter or xa
    # The rank hint (RANK_ALIGN's comment above; NOTES.md #63): out's rows, and the panel's rows (B, the backward's).
    stride_os = aligned_stride(stride_os, RANK_ALIGN)
    stride_om = aligned_stride(stride_om, RANK_ALIGN)
    r_ok = rank_mask(r, R, RANK_ALIGN)
    stride_pc = aligned_stride(stride_pc, PANEL_ALIGN)
    key_lo, key_hi = _dropout_key(seed_ptr, DROPOUT)

    for mb in range(mb_start, mb_end):
        m = m_first + (mb - mb_start) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for cb in range(cb_start, cb_end):
            c_tile = c_first + (cb - cb_start) * BLOCK_C
            c = c_tile + tl.arange(0, BLOCK_C)
            c_ok = c < C
            inp = _load_dropped_tile(inp_ptr, m, c, m_ok, c_ok, stride_im, stride_ic, c_tile, C,
                                     key_lo, key_hi, drop_threshold, keep_scale,
                                     BLOCK_M, BLOCK_C, DROPOUT, GROUP_COLUMNS, COMPUTE_DTYPE)
            panel = tl.load(panel_ptr + c[:, None] * stride_pc + r[None, :] * stride_pr,
                            mask=c_ok[:, None] & r_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
            acc = tl.dot(inp, panel, acc, input_precision=INPUT_PRECISION)
        out_ptrs = out_ptr + pid_c_group.to(tl.int64) * stride_os + m[:, None] * stride_om + r[None, :] * stride_or
        tl.store(out_ptrs, (acc * out_scale).to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=_SIZE_ARGS + ["stride_os", "stride_om", "stride_gs",
                                            "blocks_m_per_group", "blocks_c_per_group"])
def _lora_down_reduce_kernel(
    inp_ptr, panel_ptr, out_ptr, rows_ptr, panel_grad_ptr, seed_ptr,
    M, C, R,
    stride_im, stride_ic,
    stride_pc, stride_pr,
    stride_os, stride_om, stride_or,
    stride_rm, stride_rr,
    stride_gs, stride_gc, stride_gr,
    blocks_m_per_group, blocks_c_per_group,
    drop_threshold, keep_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, R_PAD: tl.constexpr,
    COMPUTE_OUT: tl.constexpr, DROPOUT: tl.constexpr, GROUP_COLUMNS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    RANK_ALIGN: tl.constexpr, PANEL_ALIGN: tl.constexpr,
):
    """One pass over inp (M x C) for its reduction over rows, and optionally its contraction:
      panel_grad[c, :] = drop(inp)[:, c]^T @ rows      (C x R; rows is M x R)
      COMPUTE_OUT: out[m, :] = drop(inp)[m, :] @ panel  (M x R; panel is C x R)
    both as float32 partials that the launcher sums (and scales).

    Program (i, j) covers the m-blocks of group i and the c-blocks of group j, m-blocks
    innermost: a c-block's panel_grad rows are accumulated in registers over the whole
    m-group and written once, to slice i. Its out rows go to slice j: the first c-block of
    the group writes them, later ones add to them. That read-add-write of an m-block's
    rows comes a whole m-group sweep after their last store, so it does not wait on it.
    (The earlier version of this pass kept out in registers instead and read-added-wrote
    panel_grad's rows for every tile, right after storing them: ~10% slower on the H200
    at r=16; benchmarks/NOTES.md #14.)
    backward: inp = dY, panel = B, rows = xa, out = dxa / s, panel_grad = dB / s.
    """
    pid_m_group = tl.program_id(0)
    pid_c_group = tl.program_id(1)
    mb_start, mb_end, cb_start, cb_end, m_first, c_first = _program_blocks(
        M, C, blocks_m_per_group, blocks_c_per_group, BLOCK_M, BLOCK_C)
    r = tl.arange(0, R_PAD).to(tl.int64)  # 64-bit: r * stride passes 2^31 for a strided adapter or xa
    # The rank hint (RANK_ALIGN's comment above; NOTES.md #63): xa's rows, and the panel's rows (B).
    stride_rm = aligned_stride(stride_rm, RANK_ALIGN)
    r_ok = rank_mask(r, R, RANK_ALIGN)
    stride_pc = aligned_stride(stride_pc, PANEL_ALIGN)
    key_lo, key_hi = _dropout_key(seed_ptr, DROPOUT)

    for cb in range(cb_start, cb_end):
        c_tile = c_first + (cb - cb_start) * BLOCK_C
        c = c_tile + tl.arange(0, BLOCK_C)
        c_ok = c < C
        if COMPUTE_OUT:
            panel = tl.load(panel_ptr + c[:, None] * stride_pc + r[None, :] * stride_pr,
                            mask=c_ok[:, None] & r_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
            # The previous c-block's stores of out rows may have come from other threads
            # of this program: the barrier makes them visible before this c-block reads them.
            tl.debug_barrier()
            # (A vector, not the scalar cb > cb_start: the interpreter rejects a scalar in a mask.)
            continues_partial = (r * 0 + cb) > cb_start
        grad_acc = tl.zeros((BLOCK_C, R_PAD), dtype=tl.float32)
        for mb in range(mb_start, mb_end):
            m = m_first + (mb - mb_start) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = m < M
            inp = _load_dropped_tile(inp_ptr, m, c, m_ok, c_ok, stride_im, stride_ic, c_tile, C,
                                     key_lo, key_hi, drop_threshold, keep_scale,
                                     BLOCK_M, BLOCK_C, DROPOUT, GROUP_COLUMNS, COMPUTE_DTYPE)
            rows = tl.load(rows_ptr + m[:, None] * stride_rm + r[None, :] * stride_rr,
                           mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
            # (As rows^T @ inp, accumulating dB^T, this was 1-8% slower on the H200: NOTES #17.)
            grad_acc = tl.dot(tl.trans(inp), rows, grad_acc, input_precision=INPUT_PRECISION)
            if COMPUTE_OUT:
                out_ptrs = (out_ptr + pid_c_group.to(tl.int64) * stride_os
                            + m[:, None] * stride_om + r[None, :] * stride_or)
                out_ok = m_ok[:, None] & r_ok[None, :]
                # The first c-block starts the partial (the buffer is uninitialised).
                previous = tl.load(out_ptrs, mask=out_ok & continues_partial[None, :], other=0.0)
                tl.store(out_ptrs, tl.dot(inp, panel, previous, input_precision=INPUT_PRECISION), mask=out_ok)
        grad_ptrs = (panel_grad_ptr + pid_m_group.to(tl.int64) * stride_gs
                     + c[:, None] * stride_gc + r[None, :] * stride_gr)
        tl.store(grad_ptrs, grad_acc, mask=c_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=_SIZE_ARGS + ["stride_rm", "stride_gs", "stride_gc", "stride_gr", "blocks_m_per_split"])
def _lora_up_kernel(
    rows_ptr, panel_ptr, out_ptr, bias_ptr, inp_ptr, inp_grad_ptr, seed_ptr,
    M, C, R,
    stride_rm, stride_rr,
    stride_pr, stride_pc,
    stride_om, stride_oc,
    stride_b,
    stride_im, stride_ic,
    stride_gs, stride_gc, stride_gr,
    blocks_m_per_split,
    out_scale, drop_threshold, keep_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, R_PAD: tl.constexpr,
    WRITE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE_INP_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
    GROUP_COLUMNS: tl.constexpr, INP_GRAD_AS_ROWS_T: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    RANK_ALIGN: tl.constexpr, PANEL_ALIGN: tl.constexpr,
):
    """One pass over the M x C tiles of a column block for the rank-r expansion.

    With the mask index m * C + c (kept values times keep_scale):
      WRITE_OUT:        out[m, c] = bias[c] + drop(out_scale * rows[m, :] @ panel[:, c])   (rows M x R, panel R x C)
      COMPUTE_INP_GRAD: inp_grad[c, :] = drop(inp)[:, c]^T @ rows                          (C x R)
    Program (j, k) owns column block j and the m-blocks of split k; its inp_grad is the
    partial over its m-range, written to slice k (stride_gs).
    forward: rows = xa, panel = B^T, out = y.  backward: rows = dxa, panel = A, out = dx,
    inp = x, inp_grad = dA^T.
    """
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    r = tl.arange(0, R_PAD).to(tl.int64)  # 64-bit: r * stride passes 2^31 for a strided adapter or xa
    # The rank hint (RANK_ALIGN's comment above; NOTES.md #63): xa's / dxa's rows, and the panel's columns (Bᵀ, the
    # forward's).
    stride_rm = aligned_stride(stride_rm, RANK_ALIGN)
    r_ok = rank_mask(r, R, RANK_ALIGN)
    stride_pc = aligned_stride(stride_pc, PANEL_ALIGN)
    if DROPOUT:
        key_lo, key_hi = load_seed_words(seed_ptr)
    if WRITE_OUT:
        # This program's column block of the panel (and bias) is loaded once.
        panel = tl.load(panel_ptr + r[:, None] * stride_pr + c[None, :] * stride_pc,
                        mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c * stride_b, mask=c_ok, other=0.0).to(tl.float32)
    if INP_GRAD_AS_ROWS_T:
        grad_acc_t = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    else:
        grad_acc = tl.zeros((BLOCK_C, R_PAD), dtype=tl.float32)

    mb_start = pid_split * blocks_m_per_split
    mb_end = tl.minimum(mb_start + blocks_m_per_split, tl.cdiv(M, BLOCK_M))
    m_first = mb_start.to(tl.int64) * BLOCK_M
    for mb in range(mb_start, mb_end):
        m = m_first + (mb - mb_start) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        tile_ok = m_ok[:, None] & c_ok[None, :]
        rows = tl.load(rows_ptr + m[:, None] * stride_rm + r[None, :] * stride_rr,
                       mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
        if DROPOUT:
            keep = dropout_keep_tile(key_lo, key_hi, m, pid_c.to(tl.int64) * BLOCK_C, C, drop_threshold, BLOCK_M,
                                     BLOCK_C, GROUP_COLUMNS)
        if WRITE_OUT:
            value = tl.dot(rows, panel, input_precision=INPUT_PRECISION) * out_scale
            if DROPOUT:
                value = value * tl.where(keep, keep_scale, 0.0)
            if HAS_BIAS:
                value = value + bias[None, :]
            tl.store(out_ptr + m[:, None] * stride_om + c[None, :] * stride_oc,
                     value.to(out_ptr.dtype.element_ty), mask=tile_ok)
        if COMPUTE_INP_GRAD:
            inp = tl.load(inp_ptr + m[:, None] * stride_im + c[None, :] * stride_ic, mask=tile_ok, other=0.0)
            if DROPOUT:
                inp = inp.to(tl.float32) * tl.where(keep, keep_scale, 0.0)
            if INP_GRAD_AS_ROWS_T:
                grad_acc_t = tl.dot(tl.trans(rows), inp.to(COMPUTE_DTYPE), grad_acc_t, input_precision=INPUT_PRECISION)
            else:
                grad_acc = tl.dot(tl.trans(inp.to(COMPUTE_DTYPE)), rows, grad_acc, input_precision=INPUT_PRECISION)
    if COMPUTE_INP_GRAD:
        grad_base = inp_grad_ptr + pid_split.to(tl.int64) * stride_gs
        if INP_GRAD_AS_ROWS_T:
            tl.store(grad_base + c[None, :] * stride_gc + r[:, None] * stride_gr,
                     grad_acc_t.to(inp_grad_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])
        else:
            tl.store(grad_base + c[:, None] * stride_gc + r[None, :] * stride_gr,
                     grad_acc.to(inp_grad_ptr.dtype.element_ty), mask=c_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["n_rows", "n_cols", "num_parts", "stride_orow", "stride_ocol"])
def _sum_partials_kernel(
    part_ptr, out_ptr, n_rows, n_cols, num_parts,
    stride_ps, stride_prow, stride_pcol,
    stride_orow, stride_ocol,
    scale,
    BLOCK_PARTS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """out[i, j] = scale * sum_s part[s, i, j], summed in a fixed order (deterministic).

    BLOCK_PARTS partials are loaded at once and reduced in registers: the sum is a chain of
    loads, one round trip per step, and with one partial per step a sum over 32 partials took
    36 µs on 4 programs (H100, k/v's dB, 12-06 10:33 under ncu) for 2 MiB."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    j = tl.arange(0, BLOCK_COLS).to(tl.int64)  # j * stride_ocol: 64-bit, as i
    s = tl.arange(0, BLOCK_PARTS).to(tl.int64)
    row_ok = i < n_rows
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    tile_ptrs = part_ptr + i[None, :, None] * stride_prow + j[None, None, :] * stride_pcol
    for first in range(0, num_parts, BLOCK_PARTS):
        parts = first + s
        # Masked by part and row only: the partials have all r_pad columns (columns past n_cols are
        # loaded, summed on their own and never stored), and a mask constant along a row lets the
        # loads be 16 bytes wide (with the column mask they were 4-byte loads).
        vals = tl.load(tile_ptrs + parts[:, None, None] * stride_ps,
                       mask=(parts < num_parts)[:, None, None] & row_ok[None, :, None], other=0.0)
        acc += tl.sum(vals, axis=0)
    tl.store(out_ptr + i[:, None] * stride_orow + j[None, :] * stride_ocol,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (j < n_cols)[None, :])


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Blocks:
    block_m: int
    block_c: int
    num_warps: int = 4
    num_stages: int = 3


# Plain-integer helpers for the launchers: triton.cdiv / triton.next_power_of_2 are
# constexpr functions whose Python call costs about 10 us each (measured, triton 3.9),
# which added up to most of the host time of a call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rank_pad(r: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two."""
    return max(16, _next_power_of_2(r))


# Under the interpreter the cost is per block operation, not per element: blocks of 32
# keep the tests fast while shapes of a few dozen still span several blocks.
_INTERPRET_BLOCKS = _Blocks(32, 32)

# Tile shapes by padded rank, for 16-bit dot operands. Chosen so that ptxas (CUDA 13,
# sm_90, triton 3.9) reports no register spills (bar 4 bytes in one variant); the Philox
# mask (about 6 live 32-bit words per element) is what needs 8 warps when dropout is on.
# float32 operands (float32 adapters) take half as many columns, 8 warps, and 16 rows at
# rank 256 (spills: none, or at most 76 bytes for ranks 17..64). Measured on the H200 at r=16
# only (benchmarks/masked_pieces.py, 2026-11-28 18:39, bf16, M=8192, dropout 0.1, 4 Llama
# shapes): the reduction over x with dropout (_UP_INP_GRAD_DROPOUT_TILES) is 1.4-1.5x faster with
# 32 x 32 tiles than 64 x 64 (e.g. 484 -> 313 us at 4096 x 4096), and after the grouped mask
# (18:53) 7-30% faster again with 16 x 64; the contraction of x with dropout
# (_DOWN_OUT_DROPOUT_TILES) is 14-17% faster with 32 x 128 than 64 x 64 (20:30, e.g. 87 -> 75 us).
# _DOWN_PANEL_GRAD_TILES at r <= 16 (20:30, the reduce kernel): 64 x 64 is 10-20% faster than
# 32 x 256 at 4096 x 1024 and 4096 x 14336 and 2-3% slower at 4096 x 4096 and 14336 x 4096
# (fastest in sum; larger tiles were not reached by the sweep). For the other passes no tile,
# warp or stage count in the sweep was more than 5% faster than these.
#   r_pad: (block_m, block_c) for _lora_down_kernel (without / with dropout), for
#          _lora_down_reduce_kernel, and for _lora_up_kernel writing only (without / with
#          dropout) / with the input gradient (without / with dropout).
_DOWN_OUT_TILES = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (64, 32), 256: (32, 32)}
_DOWN_OUT_DROPOUT_TILES = {**_DOWN_OUT_TILES, 16: (32, 128)}
# _lora_down_reduce_kernel holds a (block_c, r_pad) float32 accumulator: at r_pad >= 64 the
# tiles are narrower or shorter so that ptxas does not spill (not timed; r <= 16 was).
_DOWN_PANEL_GRAD_TILES = {16: (64, 64), 32: (64, 64), 64: (32, 128), 128: (16, 64), 256: (16, 32)}
_UP_WRITE_TILES = {16: (64, 128), 32: (64, 128), 64: (64, 128), 128: (32, 64), 256: (32, 64)}
_UP_WRITE_DROPOUT_TILES = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (32, 64), 256: (32, 64)}
_UP_INP_GRAD_TILES = {16: (64, 64), 32: (64, 64), 64: (64, 32), 128: (32, 32), 256: (32, 32)}
_UP_INP_GRAD_DROPOUT_TILES = {**_UP_INP_GRAD_TILES, 16: (16, 64)}


def _tile(tiles, r_pad: int, dropout: bool, fp32_operands: bool) -> _Blocks:
    block_m, block_c = tiles[r_pad]
    if fp32_operands:
        block_c = max(16, block_c // 2)
        block_m = 16 if r_pad >= 256 else block_m
    num_warps = 8 if dropout or r_pad >= 64 or fp32_operands else 4
    return _Blocks(block_m, block_c, num_warps)


def _down_blocks(M: int, r_pad: int, panel_grad: bool, dropout: bool, fp32_operands: bool,
                 programs_wanted: int) -> _Blocks:
    if _INTERPRET:
        return _INTERPRET_BLOCKS
    if panel_grad:
        tiles = _DOWN_PANEL_GRAD_TILES
    else:
        tiles = _DOWN_OUT_DROPOUT_TILES if dropout else _DOWN_OUT_TILES
    tile = _tile(tiles, r_pad, dropout, fp32_operands)
    block_m = tile.block_m
    if panel_grad and fp32_operands:
        block_m = 16  # the float32 accumulator and operands spill at 32 rows (ptxas, sm_90)
    if not panel_grad:
        # One program per row block: prefer smaller row blocks over splitting the row
        # (which needs partials) when M alone does not give every SM a program.
        while block_m > 16 and _cdiv(M, block_m) < programs_wanted:
            block_m //= 2
    # replace, not a new _Blocks: the tile's stage count (masked_pieces.py's sweep sets it) stays.
    return dataclasses.replace(tile, block_m=block_m)


def _up_blocks(r_pad: int, inp_grad: bool, dropout: bool, fp32_operands: bool) -> _Blocks:
    # Not shrunk for small M: the masked rows of a block cost little here, and one tile
    # shape per configuration means fewer compiled variants.
    if _INTERPRET:
        return _INTERPRET_BLOCKS
    if inp_grad:
        tiles = _UP_INP_GRAD_DROPOUT_TILES if dropout else _UP_INP_GRAD_TILES
    else:
        tiles = _UP_WRITE_DROPOUT_TILES if dropout else _UP_WRITE_TILES
    return _tile(tiles, r_pad, dropout, fp32_operands)


def _num_sms(device: torch.device) -> int:
    return device_facts.sm_count(device, on_cpu=fused_forward.INTERPRETER_PROGRAMS)


@functools.lru_cache(maxsize=None)
def _compute_dtype(lora_dtype: torch.dtype):
    """Operand dtype of tl.dot: the adapters' dtype (the interpreter's bfloat16 dot is
    wrong, so there bfloat16 operands are widened to float32)."""
    if lora_dtype == torch.bfloat16:
        return tl.float32 if _INTERPRET else tl.bfloat16
    return tl.float16 if lora_dtype == torch.float16 else tl.float32


@functools.lru_cache(maxsize=None)
def _input_precision(lora_dtype: torch.dtype, allow_tf32: bool) -> str:
    """float32 dots: TF32 when torch allows it for matmuls, else 3xTF32 (float32 accuracy
    on tensor cores; the FMA "ieee" dot needs too many registers for these tiles).
    Ignored for 16-bit operands and by the interpreter."""
    return "tf32x3" if lora_dtype == torch.float32 and not allow_tf32 else "tf32"


def _dot_options(lora_dtype: torch.dtype) -> dict:
    return dict(COMPUTE_DTYPE=_compute_dtype(lora_dtype),
                INPUT_PRECISION=_input_precision(lora_dtype, torch.backends.cuda.matmul.allow_tf32))


def _split_groups(num_blocks: int, groups: int) -> tuple[int, int]:
    """(blocks per group, number of non-empty groups) for `groups` roughly equal groups."""
    per_group = _cdiv(num_blocks, max(1, groups))
    return per_group, _cdiv(num_blocks, per_group)


# Float32 partials of the split reductions are the only extra memory of the kernels
# (besides xa, dxa). A split that needs more than PARTIAL_BUDGET_BYTES is avoided when
# the work can be arranged otherwise (fewer programs, or a second pass over dY). With
# 'post' dropout, one pass over dY for both dxa and dB saves regenerating the M x N
# mask (one Philox-4x32-10 per eight elements, the dominant cost of that pass), so that
# pass may use up to MASK_REUSE_BUDGET_BYTES or MASK_REUSE_BUDGET_FRACTION of dY's size.
# Both are transient: freed by the op, before the backward allocates dx. At the benchmarked
# shapes the layer's peak did not grow with them (+1.3 MiB at r=16, +5.3 MiB at r=64 over the
# frozen base, dropout 0.1 included; benchmarks/RESULTS.md).
PARTIAL_BUDGET_BYTES = 1 << 20
MASK_REUSE_BUDGET_BYTES = 16 << 20
MASK_REUSE_BUDGET_FRACTION = 1.0

# _lora_up_kernel's reduction over rows (dA = dxa^T drop(x)) as rows^T @ inp, accumulating the
# (r, C) result, instead of inp^T @ rows (accumulating its transpose): the transposed dot
# operand is then the small (M, r) tile, not the large dropped (M, C) one. Measured on the H200
# (masked_pieces.py ranks, 2026-11-28 20:54, bf16, M=8192, p=0.1): 8-11% faster at r=64, within
# 1% at r=16; the same change to dB in _lora_down_reduce_kernel was 1-8% slower and is not made.
# 16-bit operands only: with float32 operands ptxas spills more that way (848 bytes at rank 256).
INP_GRAD_AS_ROWS_T = True


def _inp_grad_as_rows_t(lora_dtype: torch.dtype) -> bool:
    return INP_GRAD_AS_ROWS_T and lora_dtype != torch.float32


def _mask_group_columns(dropout_on: bool, C: int, blocks: _Blocks) -> int:
    """philox.dropout_keep_tile's GROUP_COLUMNS for a tile: 8 (one Philox per eight elements) when a
    thread of the tile holds at least eight elements; else 4 (per four); 0 when groups straddle rows.

    With fewer than eight elements per thread, a group's eight mask bits are spread over threads,
    and Triton converts the joined mask's layout through shared memory: the 16-bit mask (eight per
    Philox) made the 'pre' backward's pass on 16 x 64 tiles with 8 warps (4 elements per thread)
    16% slower on the H200 than four per Philox (benchmarks/NOTES.md #20)."""
    if not dropout_on or C % 4 != 0:
        return 0
    per_thread = blocks.block_m * blocks.block_c // (32 * blocks.num_warps)
    return 8 if C % 8 == 0 and per_thread >= 8 else 4


def _down_partition(m_blocks, c_blocks, M, C, r_pad, enough, compute_out, panel_grad, budget):
    """(a, b, partial bytes): groups of m-blocks (a) and of c-blocks (b) for _lora_down_kernel
    (out only) or _lora_down_reduce_kernel (panel_grad).

    out costs b * M * r_pad * 4 bytes of float32 partials (none for the out-only kernel
    when b == 1: it writes out directly); with panel_grad, each m-group costs
    C * r_pad * 4. Preferred, in order: partials within `budget`; `enough` programs (one
    per SM) or as many as possible; fewest bytes; more m-groups.
    """
    reach = min(enough, m_blocks * c_blocks)
    candidates = {m_blocks}
    a = 1
    while a < m_blocks:
        candidates.add(a)
        a *= 2
    best = None
    for a in sorted(candidates):
        b = 1 if a >= enough else min(c_blocks, _cdiv(enough, a))
        out_partials = compute_out and (b > 1 or panel_grad)
        partial_bytes = (a * C * r_pad * 4 if panel_grad else 0) + (b * M * r_pad * 4 if out_partials else 0)
        key = (partial_bytes > budget, -min(a * b, reach), partial_bytes, -a)
        if best is None or key < best[0]:
            best = (key, a, b, partial_bytes)
    return best[1], best[2], best[3]


@dataclass(frozen=True)
class _DownPlan:
    blocks: _Blocks
    m_per_group: int
    c_per_group: int
    groups_m: int
    groups_c: int
    partial_bytes: int


@functools.lru_cache(maxsize=4096)
def _down_plan(M, C, r, device, need_out, panel_grad, dropout_on, lora_dtype, budget) -> _DownPlan:
    r_pad = _rank_pad(r)
    enough = _num_sms(device)
    blocks = _down_blocks(M, r_pad, panel_grad, dropout_on, lora_dtype == torch.float32, enough)
    m_blocks = max(1, _cdiv(M, blocks.block_m))
    c_blocks = max(1, _cdiv(C, blocks.block_c))  # C == 0 still writes out = 0
    a, b, partial_bytes = _down_partition(m_blocks, c_blocks, M, C, r_pad, enough, need_out, panel_grad, budget)
    m_per_group, a = _split_groups(m_blocks, a)
    c_per_group, b = _split_groups(c_blocks, b)
    return _DownPlan(blocks, m_per_group, c_per_group, a, b, partial_bytes)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; custom ops registered from Python (and the
    native path's Python callbacks) get no device guard. A no-op where t is on it already."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _sum_partials(partials: torch.Tensor, out: torch.Tensor, scale: float = 1.0, transpose_out: bool = False) -> None:
    """out (rows x r, or r x rows when transpose_out) <- scale * sum over partials (parts x rows x r_pad)."""
    num_parts, n_rows, r_pad = partials.shape
    n_cols = out.shape[0] if transpose_out else out.shape[1]
    stride_orow, stride_ocol = (out.stride(1), out.stride(0)) if transpose_out else (out.stride(0), out.stride(1))
    if n_rows == 0:
        return
    block_parts, block_rows = _sum_blocks(num_parts, n_rows, r_pad, _num_sms(partials.device))
    grid = (_cdiv(n_rows, block_rows),)
    replay.launch(
        _sum_partials_kernel, grid, partials, out, n_rows, n_cols, num_parts,
        partials.stride(0), partials.stride(1), partials.stride(2),
        stride_orow, stride_ocol, float(scale),
        BLOCK_PARTS=block_parts, BLOCK_ROWS=block_rows, BLOCK_COLS=r_pad,
    )


# Values one program of _sum_partials_kernel loads at once (BLOCK_PARTS x BLOCK_ROWS x r_pad
# float32: 64 registers per thread at 4 warps), and the most partials in one load.
SUM_TILE_VALUES = 8192
SUM_MAX_BLOCK_PARTS = 32
# Programs per SM the sum aims at where there are 2 partials or fewer (latency-bound loads: more in flight).
SUM_FEW_PARTS_PROGRAMS_PER_SM = 8
SUM_MIN_TILE_VALUES = 1024


def one_partial_per_step_blocks(r_pad: int) -> tuple[int, int]:
    """(BLOCK_PARTS, BLOCK_ROWS) of the sum before 12-06 (one partial per loop step; at 2 partials or fewer
    until 12-07, NOTES.md #85): the other column of masked_pieces.py's A/B (--parts sums)."""
    return 1, max(16, SUM_TILE_VALUES // 2 // r_pad)


def _sum_blocks(num_parts: int, n_rows: int, r_pad: int, sms: int) -> tuple[int, int]:
    """(BLOCK_PARTS, BLOCK_ROWS) of _sum_partials_kernel: as many partials per load as there are (up to
    SUM_MAX_BLOCK_PARTS), then rows so that about every SM gets a program, within SUM_TILE_VALUES.
    Measured on an H100 (12-06 10:43 and 10:49, NOTES.md #70, against one partial per step): this rule won
    at 7 of the 8 'post' shapes and ranks (k/v r = 16: 0.57); rows first (fewer partials per load, more
    loads) lost at r = 64 (q/o, down: 1.06). At 2 partials or fewer the rows are the only parallelism: both
    partials at once on rows for ~SUM_FEW_PARTS_PROGRAMS_PER_SM programs per SM (gate/up r = 64's dB sum: 896
    programs of (2, 16) where one partial per step, (1, 64), ran 224; the 'post' piece 0.971× one partial
    per step, H100 12-07 05:10, NOTES.md #85). The order is fixed for a given shape and SM count (as the split
    into partials is). Powers of two (tl.arange); the interpreter gets small blocks, so the tests take several
    steps (test_sum_partials_gpu_blocks_same_bits forces this rule's blocks there)."""
    if _INTERPRET:
        return 2, 8
    block_parts = min(_next_power_of_2(num_parts), SUM_MAX_BLOCK_PARTS, max(1, SUM_TILE_VALUES // (2 * r_pad)))
    # Rows for about one program per SM; at 2 partials or fewer for SUM_FEW_PARTS_PROGRAMS_PER_SM (the loads are
    # latency-bound on few programs: NOTES.md #72), each with at least SUM_MIN_TILE_VALUES (two 16-byte loads per
    # thread at 4 warps: smaller tiles leave threads idle and pay a program's fixed cost for a few bytes).
    few_parts = num_parts <= 2
    programs_per_sm = SUM_FEW_PARTS_PROGRAMS_PER_SM if few_parts else 1
    min_tile_values = SUM_MIN_TILE_VALUES if few_parts else 0
    rows_for_registers = max(2, SUM_TILE_VALUES // (block_parts * r_pad))
    rows_for_sms = max(2, _next_power_of_2(_cdiv(n_rows, programs_per_sm * sms)))
    rows_for_threads = max(2, min_tile_values // (block_parts * r_pad))
    return block_parts, min(rows_for_registers, max(rows_for_sms, rows_for_threads))


# ---------------------------------------------------------------------------
# Launchers of the two LoRA passes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dropout:
    """Dropout applied by one kernel: `on` false means none."""
    on: bool
    seed: torch.Tensor | None
    threshold: int
    keep_scale: float

    @staticmethod
    def make(p: float, seed):
        """The mask of probability p (seed: the op's seed tensor); p = 0: none (seed may be None)."""
        if p <= 0.0:
            return _Dropout(False, None, 0, 1.0)
        return _Dropout(True, seed, dropout_threshold(p), 1.0 / (1.0 - p))


def _lora_down(inp, panel, out_dtype, out_scale, dropout: _Dropout, need_out=True, rows=None, panel_grad_scale=1.0,
               budget=None):
    """Runs _lora_down_kernel (out only) or _lora_down_reduce_kernel (rows given) on inp (M x C)
    and panel (C x r).

    Returns (out, panel_grad): out = out_scale * drop(inp) @ panel as (M, r) in out_dtype
    (None unless need_out); when rows (M x r) is given, panel_grad =
    panel_grad_scale * drop(inp)^T @ rows as (C, r) in panel's dtype, else None.
    """
    M, C = inp.shape
    r = panel.shape[1]
    r_pad = _rank_pad(r)
    device = inp.device
    panel_grad_wanted = rows is not None
    if not need_out and not panel_grad_wanted:
        return None, None  # (the out-only kernel would write through its placeholder out pointer)
    out = torch.empty((M, r), dtype=out_dtype, device=device) if need_out else None
    panel_grad = torch.empty((C, r), dtype=panel.dtype, device=device) if panel_grad_wanted else None
    if M == 0:
        # Nothing to contract: out is empty and the reduction over rows is zero.
        return out, panel_grad.zero_() if panel_grad_wanted else None
    if C == 0 and panel_grad_wanted:
        # panel_grad is empty and out (a sum over no columns) is zero; the reduce kernel
        # would have no column block to write out from.
        return (out.zero_() if need_out else None), panel_grad

    budget = PARTIAL_BUDGET_BYTES if budget is None else budget
    plan = _down_plan(M, C, r, device, need_out, panel_grad_wanted, dropout.on, panel.dtype, budget)
    a, b = plan.groups_m, plan.groups_c
    blocks = plan.blocks
    seed = dropout.seed if dropout.on else inp  # placeholder pointer when unused
    common = dict(BLOCK_M=blocks.block_m, BLOCK_C=blocks.block_c, R_PAD=r_pad, DROPOUT=dropout.on,
                  GROUP_COLUMNS=_mask_group_columns(dropout.on, C, blocks), **_dot_options(panel.dtype),
                  num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    out_partials = need_out and (b > 1 or panel_grad_wanted)
    if not need_out:
        out_buffer, out_strides = inp, (0, 0, 0)
    elif out_partials:
        out_buffer = torch.empty((b, M, r_pad), dtype=torch.float32, device=device)
        out_strides = out_buffer.stride()
    else:
        out_buffer, out_strides = out, (0, out.stride(0), out.stride(1))
    # The rank hints (above the kernels): the reduce kernel's rows (xa) or the other's out (slice and row strides);
    # the panel (C, r): B in the backward, ranks contiguous; Aᵀ in the forward, not.
    rank_align, panel_align = _rank_hints(r, (rows.stride(0),) if panel_grad_wanted else out_strides[:2], panel, 1)
    common.update(RANK_ALIGN=rank_align, PANEL_ALIGN=panel_align)

    if panel_grad_wanted:
        # float32 partial per m-group, written once by its program per c-block.
        grad_buffer = torch.empty((a, C, r_pad), dtype=torch.float32, device=device)
        replay.launch(
            _lora_down_reduce_kernel, (a, b), inp, panel, out_buffer, rows, grad_buffer, seed,
            M, C, r,
            inp.stride(0), inp.stride(1),
            panel.stride(0), panel.stride(1),
            *out_strides,
            rows.stride(0), rows.stride(1),
            *grad_buffer.stride(),
            plan.m_per_group, plan.c_per_group,
            dropout.threshold, dropout.keep_scale,
            COMPUTE_OUT=need_out, **common,
        )
    else:
        replay.launch(
            _lora_down_kernel, (a, b), inp, panel, out_buffer, seed,
            M, C, r,
            inp.stride(0), inp.stride(1),
            panel.stride(0), panel.stride(1),
            *out_strides,
            plan.m_per_group, plan.c_per_group,
            float(out_scale) if not out_partials else 1.0, dropout.threshold, dropout.keep_scale,
            **common,
        )
    if out_partials:
        _sum_partials(out_buffer, out, scale=out_scale)
    if panel_grad_wanted:
        _sum_partials(grad_buffer, panel_grad, scale=panel_grad_scale)
    return out, panel_grad


# 'post' dropout at r > 32 over a wide dY: two passes, one per reduction, measured faster than the
# one pass (H200, M = 8192, 4096 x 14336, r = 64: 425 against 580 us, benchmarks/NOTES.md #32); at
# N = 4096 and 1024 one pass won (qo r = 64: 184 against 256). The native path runs its own CUDA step at
# these sizes too since that step got faster than both (csrc/lora_aten.cpp use_native_masked_grad_y, #80).
WIDE_MASKED_TWO_PASSES_COLUMNS = 8192
WIDE_MASKED_TWO_PASSES_MIN_RANK = 33


def _wide_masked_two_passes(N: int, r: int, post_dropout: bool) -> bool:
    return post_dropout and N >= WIDE_MASKED_TWO_PASSES_COLUMNS and r >= WIDE_MASKED_TWO_PASSES_MIN_RANK


def _grad_y_pass(g2, lora_B, xa, lora_dtype, scale, post: _Dropout, need_grad_xa, need_grad_B):
    """(dxa, dB) = (s drop(g) B, s drop(g)^T xa), each None unless needed.

    Both come from one pass over g when that pass can give at least half the SMs a
    program with its float32 partials within the budget; otherwise from two passes, one
    per reduction direction, each needing only small partials. With 'post' dropout the one
    pass saves regenerating the M x N mask, so it may use more: MASK_REUSE_BUDGET_BYTES,
    or MASK_REUSE_BUDGET_FRACTION of dY's own size (already in memory) when that is larger.
    """
    M, N = g2.shape
    r = lora_B.shape[1]
    rows = xa if need_grad_B else None
    if need_grad_xa and need_grad_B and M > 0:
        budget = PARTIAL_BUDGET_BYTES
        if post.on:
            budget = max(MASK_REUSE_BUDGET_BYTES, int(g2.numel() * g2.element_size() * MASK_REUSE_BUDGET_FRACTION))
        plan = _down_plan(M, N, r, g2.device, True, True, post.on, lora_B.dtype, budget)
        m_blocks = _cdiv(M, plan.blocks.block_m)
        c_blocks = _cdiv(N, plan.blocks.block_c)
        programs_wanted = min(_num_sms(g2.device), m_blocks * c_blocks)
        if (plan.partial_bytes > budget or 2 * plan.groups_m * plan.groups_c < programs_wanted
                or _wide_masked_two_passes(N, r, post.on)):
            grad_xa, _ = _lora_down(g2, lora_B, lora_dtype, scale, post)
            _, grad_B = _lora_down(g2, lora_B, lora_dtype, scale, post, need_out=False, rows=xa,
                                   panel_grad_scale=scale)
            return grad_xa, grad_B
        return _lora_down(g2, lora_B, lora_dtype, scale, post, rows=rows, panel_grad_scale=scale, budget=budget)
    return _lora_down(g2, lora_B, lora_dtype, scale, post, need_out=need_grad_xa, rows=rows, panel_grad_scale=scale)


@functools.lru_cache(maxsize=4096)
def _up_plan(M, C, r, device, inp_grad, dropout_on, lora_dtype, budget):
    """(blocks, column blocks, row splits, row blocks per split) of _lora_up_kernel."""
    blocks = _up_blocks(_rank_pad(r), inp_grad, dropout_on, lora_dtype == torch.float32)
    m_blocks = _cdiv(M, blocks.block_m)
    c_blocks = _cdiv(C, blocks.block_c)
    sms = _num_sms(device)
    # Write-only passes take more programs (latency hiding); a reduction takes one per SM,
    # each split costing C * r_pad * 4 bytes of partials (within the budget).
    wanted = sms if inp_grad else 2 * sms
    splits = min(max(1, m_blocks), _cdiv(wanted, c_blocks))
    if inp_grad:
        splits = max(1, min(splits, budget // (C * _rank_pad(r) * 4)))
    m_per_split, splits = _split_groups(max(1, m_blocks), splits)
    return blocks, c_blocks, splits, m_per_split


def _lora_up(rows, panel, dropout: _Dropout, out=None, out_scale=1.0, bias=None, inp=None, inp_grad_dtype=None):
    """Runs _lora_up_kernel with rows (M x r) and panel (r x C).

    When out (M x C) is given, writes out = bias + drop(out_scale * rows @ panel) into it.
    When inp (M x C) is given, returns drop(inp)^T @ rows as an (r, C) tensor of
    inp_grad_dtype; else returns None.
    """
    M, r = rows.shape
    C = panel.shape[1]
    r_pad = _rank_pad(r)
    device = rows.device
    write_out = out is not None
    inp_grad_wanted = inp is not None
    inp_grad = torch.empty((r, C), dtype=inp_grad_dtype, device=device) if inp_grad_wanted else None
    if C == 0 or (M == 0 and not inp_grad_wanted):
        return inp_grad

    blocks, c_blocks, splits, m_per_split = _up_plan(M, C, r, device, inp_grad_wanted, dropout.on, panel.dtype,
                                                     PARTIAL_BUDGET_BYTES)

    if inp_grad_wanted and splits > 1:
        grad_buffer = torch.empty((splits, C, r_pad), dtype=torch.float32, device=device)
        grad_strides = grad_buffer.stride()
    elif inp_grad_wanted:
        # One split: the kernel writes (C, r) rows straight into the (r, C) result.
        grad_buffer = inp_grad
        grad_strides = (0, inp_grad.stride(1), inp_grad.stride(0))
    else:
        grad_buffer, grad_strides = None, (0, 0, 0)

    placeholder = rows
    # The rank hints (above the kernels): the rows' row stride; the panel (r, C): Bᵀ in the forward, ranks
    # contiguous; A in the backward, not.
    rank_align, panel_align = _rank_hints(r, (rows.stride(0),), panel, 0)
    replay.launch(
        _lora_up_kernel, (c_blocks, splits), rows, panel, out if write_out else placeholder, bias if bias is not None else placeholder,
        inp if inp_grad_wanted else placeholder, grad_buffer if inp_grad_wanted else placeholder,
        dropout.seed if dropout.on else placeholder,
        M, C, r,
        rows.stride(0), rows.stride(1),
        panel.stride(0), panel.stride(1),
        *((out.stride(0), out.stride(1)) if write_out else (0, 0)),
        bias.stride(0) if bias is not None else 0,
        *((inp.stride(0), inp.stride(1)) if inp_grad_wanted else (0, 0)),
        *grad_strides,
        m_per_split,
        float(out_scale), dropout.threshold, dropout.keep_scale,
        BLOCK_M=blocks.block_m, BLOCK_C=blocks.block_c, R_PAD=r_pad,
        WRITE_OUT=write_out, HAS_BIAS=bias is not None, COMPUTE_INP_GRAD=inp_grad_wanted, DROPOUT=dropout.on,
        GROUP_COLUMNS=_mask_group_columns(dropout.on, C, blocks), INP_GRAD_AS_ROWS_T=_inp_grad_as_rows_t(panel.dtype),
        **_dot_options(panel.dtype),
        RANK_ALIGN=rank_align, PANEL_ALIGN=panel_align,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    if inp_grad_wanted and splits > 1:
        _sum_partials(grad_buffer, inp_grad, transpose_out=True)
    return inp_grad


# ---------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------


# Largest rank the kernels take; the tiles above are sized up to it.
MAX_KERNEL_RANK = 256
# From this many tokens a dropout-free forward on Hopper is fused_forward's one GEMM (TMA; x A^T
# from the base GEMM's x tiles, the LoRA term one more K step of its accumulator) instead of
# the two thin kernels below plus cuBLAS. Measured on the H200 at M = 8192, r = 16 (NOTES.md #26,
# ratio to the base GEMM): 1.06-1.24 against this module's 1.5-2.7 at the four Llama shapes.
# Fewer tokens were not measured.
FUSED_FORWARD_MIN_ROWS = 4096
# With 'post' dropout, when lora_ext._C.set_fused_post_dropout(True) (the default, measured: NOTES.md #33,
# #39; LORA_EXT_FUSED_POST_DROPOUT=0 turns it off), the fused GEMM applies the mask in its epilogue, up
# to this many input features, or up to the narrow limit at k/v widths (out features <= 2048): the
# native path's rule (csrc/lora_aten.cpp, use_fused_post_dropout_forward; NOTES.md #53).
FUSED_POST_FORWARD_MAX_INPUTS = 4096
FUSED_POST_FORWARD_NARROW_MAX_INPUTS = 8192
FUSED_POST_FORWARD_NARROW_MAX_OUTPUTS = 2048


def fused_post_forward_takes_width(K: int, N: int) -> bool:
    """Whether a 'post' dropout forward of K inputs and N outputs is in the fused GEMM's measured range."""
    return K <= FUSED_POST_FORWARD_MAX_INPUTS or (K <= FUSED_POST_FORWARD_NARROW_MAX_INPUTS
                                                   and N <= FUSED_POST_FORWARD_NARROW_MAX_OUTPUTS)


def _uses_composition(x, lora_A) -> bool:
    """float64 (no tl.dot) and ranks above MAX_KERNEL_RANK run the torch composition."""
    return x.dtype == torch.float64 or lora_A.dtype == torch.float64 or lora_A.shape[0] > MAX_KERNEL_RANK


def linear_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, dropout_position="post", seed=None):
    """lora::linear on Triton: returns (y, xa) exactly as csrc/lora_aten.cpp does."""
    M, K, N, r = ops.check_linear_args(x, weight, bias, lora_A, lora_B, dropout_p, dropout_position, seed, "triton")
    ops.check_scale(scale, x, lora_A)
    if _uses_composition(x, lora_A):
        return _composite_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed, M, K, N)
    dropout = dropout_p > 0.0
    with device_guard(x):
        x2 = x.reshape(M, K)  # a view when x's strides allow
        fused_post = (dropout and dropout_position == "post" and fused_post_forward_takes_width(K, N)
                      and _C.fused_post_dropout_enabled())
        if ((not dropout or fused_post) and M >= FUSED_FORWARD_MIN_ROWS
                and fused_forward.supports(x2, weight, bias, lora_A, lora_B)):
            fused = fused_forward.unless_out_of_resources(
                lambda: fused_forward.linear_forward(x2, weight, bias, lora_A, lora_B, scale, dropout_p if fused_post
                                                     else 0.0, seed if fused_post else None))
            if fused is not None:  # else this GPU has too little shared memory for it: composed below
                y2, xa = fused
                return y2.view(*x.shape[:-1], N), xa
        pre_p, post_p = _positioned_p(dropout_p, dropout_position)
        xa = masked_down(x2, lora_A, seed, pre_p)
        y2 = masked_up_forward(xa, lora_B, bias, x2, scale, seed, post_p)
        if weight is not None:
            y2.addmm_(x2, weight.t())
    return y2.view(*x.shape[:-1], N), xa


def _positioned_p(dropout_p: float, dropout_position: str) -> tuple[float, float]:
    """(p of the 'pre' mask, p of the 'post' mask): dropout_p at its position, 0 (no mask) at the other."""
    if dropout_p <= 0.0:
        return 0.0, 0.0
    return (dropout_p, 0.0) if dropout_position == "pre" else (0.0, dropout_p)


def linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed, output_mask):
    """lora::linear_backward on Triton: (grad_x, grad_weight, grad_bias, grad_A, grad_B), with
    empty tensors for the gradients output_mask does not ask for (as csrc/lora_aten.cpp)."""
    M, K, N, r = ops.check_linear_args(x, weight, None, lora_A, lora_B, dropout_p, dropout_position, seed, "triton")
    # The same checks, and messages, as the CPU kernel (csrc/checks.h) and the fake kernel.
    ops.check_scale(scale, x, lora_A)
    ops.check_linear_backward_args(grad_y, x, xa, lora_A, weight, output_mask, M, N, r)
    if _uses_composition(x, lora_A):
        return _composite_backward(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed,
                                   output_mask, M, K, N)
    need_x, need_weight, need_bias, need_A, need_B = (bool(v) for v in output_mask)
    pre_p, post_p = _positioned_p(dropout_p, dropout_position)
    grad_x = x.new_empty(0)
    grad_weight = x.new_empty(0)
    grad_bias = x.new_empty(0)
    grad_A = lora_A.new_empty(0)
    grad_B = lora_B.new_empty(0)

    with device_guard(x):
        g2 = grad_y.reshape(M, N)
        x2 = x.reshape(M, K)
        need_dxa = need_x or need_A
        if need_dxa or need_B:
            # dxa = s drop(dY) B and dB = s drop(dY)^T xa, in one pass over dY when it fits.
            grad_xa, grad_B_computed = masked_grad_y(g2, lora_B, xa, scale, seed, post_p, need_dxa, need_B)
            if need_B:
                grad_B = grad_B_computed
        if need_dxa:
            # One pass over x: dx = drop(dxa A) (written first, cuBLAS then adds dY W onto
            # it) and dA = dxa^T drop(x).
            grad_x2, grad_A_computed = masked_up(grad_xa, lora_A, x2, seed, pre_p, need_x, need_A)
            if need_A:
                grad_A = grad_A_computed
            if need_x:
                if weight is not None:
                    grad_x2.addmm_(g2, weight)
                grad_x = grad_x2.view(x.shape)
        if need_weight:
            grad_weight = torch.mm(g2.t(), x2)
        if need_bias:
            grad_bias = g2.sum(0)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B


# ---------------------------------------------------------------------------
# The thin products as pieces: the Triton backend's own route (linear_forward and linear_backward
# above: each is these pieces and cuBLAS), and the native CUDA path's masked steps (csrc/lora_aten.cpp:
# with dropout the native path would otherwise write a dropped copy of x (M x K, 'pre') or of dY
# (M x N, 'post') for cuBLAS to read; these apply the regenerated mask on load instead). The native path
# calls masked_down, masked_grad_y and masked_up from C++ through lora_ext._C.set_triton_masked_pieces,
# replayed without Python from the second call with a key (replay.py; only for what the kernels take: no
# float64, rank <= MAX_KERNEL_RANK); the Triton backend calls them from Python (NOTES.md #102 would run its
# route from C++ too). p = 0 means no mask (the seed may then be None). Unneeded results come back as
# empty tensors.
# ---------------------------------------------------------------------------


def masked_down(x2, lora_A, seed, p):
    """xa = drop_pre(x2) A^T, (M, r) in lora_A's dtype: the 'pre' forward without a dropped copy of x."""
    with device_guard(x2):
        xa, _ = _lora_down(x2, lora_A.t(), lora_A.dtype, 1.0, _Dropout.make(p, seed))
    return xa


def masked_up_forward(xa, lora_B, bias, x2, scale, seed, p):
    """y2 = bias + drop_post(scale xa B^T), (M, N) in x2's dtype: the composed forward's LoRA term, written
    first for cuBLAS to add x W^T onto (x2 gives the dtype and device only). bias is read with its stride
    (e.g. a slice of a fused qkv bias)."""
    with device_guard(x2):
        y2 = torch.empty((x2.shape[0], lora_B.shape[0]), dtype=x2.dtype, device=x2.device)
        _lora_up(xa, lora_B.t(), _Dropout.make(p, seed), out=y2, out_scale=scale, bias=bias)
    return y2


def masked_grad_y(g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B):
    """(s drop_post(g2) B, s drop_post(g2)^T xa): the 'post' backward without a dropped copy of dY."""
    with device_guard(g2):
        grad_xa, grad_B = _grad_y_pass(g2, lora_B, xa, lora_B.dtype, scale, _Dropout.make(p, seed),
                                       need_grad_xa, need_grad_B)
    return (grad_xa if grad_xa is not None else xa.new_empty(0),
            grad_B if grad_B is not None else lora_B.new_empty(0))


def masked_up(grad_xa, lora_A, x2, seed, p, need_x, need_A):
    """(drop_pre(grad_xa A) as (M, K) in x2's dtype, grad_xa^T drop_pre(x2) as (r, K)): the 'pre'
    backward's LoRA part of dx and dA in one pass over x, without a dropped copy of x."""
    M, K = x2.shape
    with device_guard(x2):
        grad_x2 = torch.empty((M, K), dtype=x2.dtype, device=x2.device) if need_x else None
        grad_A = _lora_up(grad_xa, lora_A, _Dropout.make(p, seed), out=grad_x2, inp=x2 if need_A else None,
                          inp_grad_dtype=lora_A.dtype)
    return (grad_x2 if need_x else x2.new_empty(0), grad_A if need_A else lora_A.new_empty(0))


# ---------------------------------------------------------------------------
# float64: the torch composition of csrc/lora_aten.cpp (tl.dot is not used for
# float64). The dropout mask is materialised here, as a temporary of the call only.
# ---------------------------------------------------------------------------


def _dropout_scaled(t, seed, p, kept_scale):
    """t * (keep ? kept_scale : 0) for the 2-D t, as a new tensor (dropout_scale_ of lora_aten.cpp).

    Dropped elements are multiplied by 0, so a dropped NaN/Inf stays NaN as in the other kernels."""
    keep = dropout_keep_mask(seed, t.shape[0], t.shape[1], p)
    return torch.where(keep, t * kept_scale, t * 0.0)


def _composite_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed, M, K, N):
    lora_dtype = lora_A.dtype
    dropout = dropout_p > 0.0
    pre = dropout and dropout_position == "pre"
    post = dropout and dropout_position == "post"
    keep_scale = 1.0 / (1.0 - dropout_p)
    with device_guard(x):
        x2 = x.reshape(M, K)
        x_lora = x2.to(lora_dtype)
        if pre:
            x_lora = _dropout_scaled(x_lora, seed, dropout_p, keep_scale)
        xa = torch.mm(x_lora, lora_A.t())
        if post or lora_dtype != x.dtype:
            lora_out = torch.mm(xa, lora_B.t())
            lora_out = _dropout_scaled(lora_out, seed, dropout_p, scale * keep_scale) if post else lora_out.mul_(scale)
            if weight is not None:
                y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
                y.add_(lora_out)
            else:
                y = lora_out.to(x.dtype)
                if bias is not None:
                    y.add_(bias)
        else:
            if bias is not None:
                y = torch.addmm(bias, xa, lora_B.t(), alpha=scale)
            else:
                # beta=0: the uninitialised input is ignored.
                y = torch.addmm(torch.empty((M, N), dtype=x.dtype, device=x.device), xa, lora_B.t(),
                                beta=0, alpha=scale)
            if weight is not None:
                y.addmm_(x2, weight.t())
    return y.view(*x.shape[:-1], N), xa


def _composite_backward(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed,
                        output_mask, M, K, N):
    need_x, need_weight, need_bias, need_A, need_B = (bool(v) for v in output_mask)
    lora_dtype = lora_A.dtype
    dropout = dropout_p > 0.0
    pre = dropout and dropout_position == "pre"
    post = dropout and dropout_position == "post"
    keep_scale = 1.0 / (1.0 - dropout_p)
    grad_x, grad_weight, grad_bias = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    grad_A, grad_B = lora_A.new_empty(0), lora_B.new_empty(0)
    with device_guard(x):
        g = grad_y.reshape(M, N)
        x2 = x.reshape(M, K)
        g_lora = g.to(lora_dtype)
        if post:
            g_lora = _dropout_scaled(g_lora, seed, dropout_p, keep_scale)
        if need_B:
            grad_B = torch.mm(g_lora.t(), xa).mul_(scale)
        if need_A or need_x:
            grad_xa = torch.mm(g_lora, lora_B).mul_(scale)
            if need_A:
                x_lora = x2.to(lora_dtype)
                if pre:
                    x_lora = _dropout_scaled(x_lora, seed, dropout_p, keep_scale)
                grad_A = torch.mm(grad_xa.t(), x_lora)
            if need_x:
                if not pre and lora_dtype == x.dtype:
                    grad_x = torch.mm(g, weight) if weight is not None else torch.zeros((M, K), dtype=x.dtype,
                                                                                       device=x.device)
                    grad_x.addmm_(grad_xa, lora_A)
                else:
                    grad_x_lora = torch.mm(grad_xa, lora_A)
                    if pre:
                        grad_x_lora = _dropout_scaled(grad_x_lora, seed, dropout_p, keep_scale)
                    if weight is not None:
                        grad_x = torch.mm(g, weight)
                        grad_x.add_(grad_x_lora)
                    else:
                        grad_x = grad_x_lora.to(x.dtype)
                grad_x = grad_x.view(x.shape)
        if need_weight:
            grad_weight = torch.mm(g.t(), x2)
        if need_bias:
            grad_bias = g.sum(0)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
