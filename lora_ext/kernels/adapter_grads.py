"""Both adapter gradients of the dropout-free backward in one Triton launch, without partials
(and dA alone, `grad_A_only`, where the 'post' dropout backward's masked step gives dB; dB alone,
`grad_B_only`, where the two run apart so that grad_xa is freed before dB is allocated).

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

Any strides; the small operands' r is padded to 16 for the MMA by masked loads. The operands of
all four share one 16-bit dtype (float16/bfloat16), float32 accumulation, outputs in that dtype.
Under TRITON_INTERPRET=1 it runs on CPU tensors (float16; the CI tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_facts, replay
from .rank_hint import aligned_stride, rank_alignment, rank_mask

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


def tile_config(columns: int, r_pad: int, num_sms: int = H200_SMS,
                shared_bytes: int = HOPPER_SHARED_BYTES) -> dict:
    """The launch's tiles for `columns` output columns in all (K + N for both gradients, K for dA
    alone, N for dB alone) at the padded rank r_pad, on a GPU of num_sms SMs whose blocks may use
    shared_bytes of shared memory: block_m, block_c, num_stages, num_warps."""
    blocks = triton.cdiv(columns, 64)
    if blocks >= num_sms:
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
    return dict(block_m=block_m, block_c=block_c, num_stages=stages, num_warps=4)


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory bytes a block may use) of a CUDA device; the H200's for CPU tensors, so that
    the interpreter tests take the rule's GPU choices."""
    return (device_facts.sm_count(device, on_cpu=H200_SMS),
            device_facts.shared_bytes_per_block(device, on_cpu=HOPPER_SHARED_BYTES))


@triton.jit
def _accumulate_tile(acc, small_ptr, big_ptr, m0, M, rank_ok, stride_small_m, stride_big_m, big_col_offsets, col_ok,
                     R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc + small[rows, ranks]ᵀ big[rows, cols] for the BLOCK_M rows from m0 (the ranks given by their
    in-bounds mask, the columns by their offsets into big and their in-bounds mask)."""
    ranks = tl.arange(0, R_PAD)
    rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets: x may hold more than 2^31 elements
    row_ok = rows < M
    small = tl.load(small_ptr + rows[None, :] * stride_small_m + ranks[:, None],
                    mask=rank_ok[:, None] & row_ok[None, :], other=0.0)  # (R_PAD, BLOCK_M)
    big = tl.load(big_ptr + rows[:, None] * stride_big_m + big_col_offsets[None, :],
                  mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_C)
    return tl.dot(small, big, acc)


@triton.jit
def _thin_product(small_ptr, big_ptr, out_ptr, M, C, R, stride_small_m, stride_big_m, stride_big_c,
                  stride_out_r, stride_out_c, scale, col_block,
                  R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RANK_ALIGN: tl.constexpr):
    """out[:, cols] = scale * small[:, :R]ᵀ big[:, cols] for this program's BLOCK_C columns."""
    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    # 64-bit column offsets too: with a column-major big operand (a transposed x), cols * stride_big_c
    # passes 2^31 from 2^31 elements on, in int32 a wrapped address.
    big_col_offsets = cols.to(tl.int64) * stride_big_c
    col_ok = cols < C
    ranks = tl.arange(0, R_PAD)
    stride_small_m = aligned_stride(stride_small_m, RANK_ALIGN)
    rank_ok = rank_mask(ranks, R, RANK_ALIGN)
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):  # software-pipelined by the launch's num_stages
        acc = _accumulate_tile(acc, small_ptr, big_ptr, m0, M, rank_ok, stride_small_m, stride_big_m,
                               big_col_offsets, col_ok, R_PAD, BLOCK_M)
    tl.store(out_ptr + ranks[:, None] * stride_out_r + cols[None, :] * stride_out_c,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _adapter_grads_kernel(grad_xa_ptr, x_ptr, grad_A_ptr, xa_ptr, g_ptr, grad_B_ptr, M, K, N, R,
                          stride_grad_xa_m, stride_x_m, stride_x_k, stride_xa_m, stride_g_m, stride_g_n,
                          scale_A, scale_B, blocks_A,
                          R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                          RANK_ALIGN: tl.constexpr):
    # Programs [0, blocks_A) own dA's column blocks, the rest dB's; dA (r, K) row-major, dB
    # (N, r) row-major written as the transposed (r, N) product.
    pid = tl.program_id(0)
    if pid < blocks_A:
        _thin_product(grad_xa_ptr, x_ptr, grad_A_ptr, M, K, R, stride_grad_xa_m, stride_x_m, stride_x_k,
                      K, 1, scale_A, pid, R_PAD, BLOCK_M, BLOCK_C, RANK_ALIGN)
    else:
        _thin_product(xa_ptr, g_ptr, grad_B_ptr, M, N, R, stride_xa_m, stride_g_m, stride_g_n,
                      1, R, scale_B, pid - blocks_A, R_PAD, BLOCK_M, BLOCK_C, RANK_ALIGN)


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
                  scale_A: float, scale_B: float, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA, dB) = (scale_A grad_xaᵀ x2, scale_B g2ᵀ xa), both in the operands' dtype (`supported`).
    `config` overrides tile_config's choice (block_m, block_c, num_stages, num_warps), for the probes."""
    return _launch(grad_xa, x2, xa, g2, scale_A, scale_B, True, True, config)


def grad_A_only(grad_xa: torch.Tensor, x2: torch.Tensor, scale_A: float, **config) -> torch.Tensor:
    """dA = scale_A grad_xaᵀ x2 alone, where dB comes from elsewhere (the 'post' dropout backward's
    masked step) or is not wanted: the same kernel with dA's programs only (`supported` with
    grad_xa in xa's place and x2 in g2's)."""
    return _launch(grad_xa, x2, grad_xa, x2, scale_A, 0.0, True, False, config)[0]


def grad_B_only(xa: torch.Tensor, g2: torch.Tensor, scale_B: float, **config) -> torch.Tensor:
    """dB = scale_B g2ᵀ xa (N, r) alone: the same kernel with dB's programs only (`supported` with xa in
    grad_xa's place and g2 in x2's). The native backward runs dA and dB apart where that keeps its extra
    memory within budget (csrc/lora_aten.cpp, split_adapter_grads_for_memory): grad_xa is freed between."""
    return _launch(xa, g2, xa, g2, 0.0, scale_B, False, True, config)[1]


def _launch(grad_xa, x2, xa, g2, scale_A, scale_B, with_A, with_B, config):
    M, r = xa.shape
    K, N = x2.shape[1], g2.shape[1]
    r_pad = max(16, triton.next_power_of_2(r))
    columns = (K if with_A else 0) + (N if with_B else 0)
    cfg = {**tile_config(columns, r_pad, *_device_limits(xa.device)), **config}
    rank_align = cfg.get("rank_align", rank_alignment(r, grad_xa.stride(0), xa.stride(0)))
    if any(n % rank_align for n in (r, grad_xa.stride(0), xa.stride(0))):  # a false hint reads other rows
        raise ValueError(f"rank_align={rank_align} must divide r ({r}) and the row strides of grad_xa and xa "
                         f"({grad_xa.stride(0)}, {xa.stride(0)})")
    # An output no program writes is not allocated: the other one stands in for its pointer.
    grad_A = torch.empty((r, K), dtype=xa.dtype, device=xa.device) if with_A else None
    grad_B = torch.empty((N, r), dtype=xa.dtype, device=xa.device) if with_B else None
    block_c = cfg["block_c"]
    blocks_A = triton.cdiv(K, block_c) if with_A else 0
    blocks_B = triton.cdiv(N, block_c) if with_B else 0
    replay.launch(
        _adapter_grads_kernel, (blocks_A + blocks_B,),
        grad_xa, x2, grad_A if with_A else grad_B, xa, g2, grad_B if with_B else grad_A, M, K, N, r,
        grad_xa.stride(0), x2.stride(0), x2.stride(1), xa.stride(0), g2.stride(0), g2.stride(1),
        float(scale_A), float(scale_B), blocks_A,
        R_PAD=r_pad, BLOCK_M=cfg["block_m"], BLOCK_C=block_c,
        RANK_ALIGN=rank_align, num_stages=cfg["num_stages"],
        num_warps=cfg["num_warps"],
    )
    return grad_A, grad_B
