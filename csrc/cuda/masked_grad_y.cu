// The 'post' dropout backward's LoRA step in one pass over dY, natively:
//   grad_xa = s * drop(dY) B      (M x r)
//   grad_B  = s * drop(dY)^T xa   (N x r)
// with drop(dY) = dY * keep / (1 - p) regenerated from the seed (philox.h), never stored.
//
// Why a CUDA kernel next to the Triton one (triton_lora.masked_grad_y): on the H200 at
// M = 8192, 4096 x 4096, r = 16 the Triton pass took 147 us against 41 us for cuBLAS without
// a mask; Nsight Compute showed it latency-bound (one 8-warp program per SM at 177 registers,
// 35% of issue slots used, 12 barriers per tile) and 31% of its instructions in Philox
// (benchmarks/NOTES.md #19). Here each thread reads its eight consecutive dY elements as one
// 16-byte load, one Philox evaluation gives their eight masks (philox.h), dY times its 0/1
// flags is written once to shared memory, and both products read it from there on tensor
// cores (ldmatrix + mma.sync): the tile as A for grad_xa, its transpose (ldmatrix .trans) as A
// for grad_B. The next tile's loads are issued before this tile's products, and two programs
// share an SM (at ranks <= 16). Measured: 63.8 us there (NOTES.md #21; a WMMA version took 80).
// At R_PAD 32 and 64 the eight masks of a vector are computed a tile ahead, during the previous tile's
// products, and kept as 8 bits (TileKeeps; NOTES.md #84): the mask step itself only applies them. At R_PAD 16
// each tile's are computed in its own mask step (#86).
//
// Work split (the group sizes from masked_grad_y_grid.h): program (i, j) owns the 64-row blocks of row group i
// and the 128-column blocks of column group j, row blocks innermost. The first half of its warps own
// grad_xa's rows (16 each; on 8 warps all ranks, on the 16 warps of R_PAD = 64 half of them), summed over
// the program's column blocks in slice j of a float32 partial; the second half own grad_B's rows (32
// each on 8 warps, 16 on 16), accumulated in registers over the row group and written once to slice i.
// A last small kernel per output sums the slices in a fixed order (deterministic: no atomics) and
// applies s / (1 - p).
//
// Loads (STAGES): 0, the measured default, reads each thread's next-tile vectors into registers
// one tile ahead. That keeps 16 KiB per program in flight, 32 KiB per SM with two programs,
// while the H200's HBM needs ~48 KiB per SM in flight (~32 GB/s per SM x ~1.5 us loaded
// latency): at 1.1 TB/s (gate_up 205.8 us for 224 MiB, 12-04 21:29) the pass is latency-bound.
// 3: cp.async copies whole tiles into a ring of three shared-memory stages, two tiles ahead
// (no registers held for them), each thread masks in place the vectors it copied itself, and the
// products read the stage (benchmarks/NOTES.md #36). With two programs per SM (64 KiB in flight)
// it measured 2-20% slower than the register scheme on the H200 (#39); at r <= 16 it now runs
// three per SM, which its 80 registers allow (96 KiB in flight, #55): faster at some shapes on an
// H100 under the first split of the work, and 0.996-1.19x the register loads once both use the
// balanced rule (masked_grad_y_grid.h, over their own slot counts; #56). Off by default: LORA_EXT_MASKED_GRAD_Y_STAGES=3 or
// set_masked_grad_y_stages(3).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../lora_aten.h"
#include "../masked_grad_y_grid.h"
#include "../philox.h"
#include "mma_sm80.cuh"
#include "per_device.h"

namespace lora {
namespace {

constexpr int kTileRows = 64;
constexpr int kTileCols = 128;
static_assert(kTileRows == kMaskedTileRows && kTileCols == kMaskedTileCols, "masked_grad_y_grid.h splits these tiles");
// Threads per program: 8 warps, and 16 at R_PAD = 64. There one program fits an SM (its accumulators
// need ~255 registers a thread on 8 warps), so 8 warps left each scheduler two warps to hide a tile's
// chain of loads, mask, barrier and products (ncu, H100, k/v: a program's tile took ~9,600 cycles at r = 64
// and ~7,800 at r = 16, where two programs share the SM; benchmarks/NOTES.md #77, #78). On 16 warps each
// warp keeps half the accumulators (grad_xa's rows split by rank halves, grad_B's by 16-column panels), so
// the program fits 128 registers a thread. Every output element's products run in the same order either
// way: the same bits by construction (not compared on a GPU, where only one variant is built). Measured
// (H100, 12-06 18:10, NOTES.md #78; the step with its sum, device time): 4-6% faster at every r = 64
// shape (k/v 52.4 -> 49.9 us, q/o and down 147 -> 141, gate/up 503 -> 471), far from the ~1.5x
// predicted: more warps do not shorten a tile's chain, so what sets it is not the warps per scheduler.
// A larger part was the element-wise loads of B's panel and xa's rows (load_thin: 21-23% off the step
// at r = 64 once they were vectors, NOTES.md #79).
template <int R_PAD>
constexpr int program_threads() { return R_PAD == 64 ? 512 : 256; }
// Shared rows are padded by 16 bytes so that consecutive rows start in different banks.
constexpr int kPad = 8;
// Eight 16-bit elements per 16-byte vector: one vector is one Philox group (kMaskGroup).
constexpr int kVectorsPerRow = kTileCols / kMaskGroup;
template <int THREADS>
constexpr int vectors_per_thread() { return kTileRows * kVectorsPerRow / THREADS; }
constexpr int kMaxRank = 64;

// The register scheme at R_PAD 64 copies B's next panel (by cp.async, into a second buffer) beside a column
// block's last tile, so that the next block's first tile does not wait a round trip for it: the step's largest
// single wait at k/v r = 64 (ncu, H100). Measured (benchmarks/NOTES.md #87, H100, the step with its sum): at r = 64
// k/v 33.7 -> 32.4 us, q/o 97.6 -> 95.3, down 97.2 -> 95.6, gate/up even; at r = 16 and 32, where it also took the
// shared memory of a second panel, +0.4-2.8% in seven of the eight shapes (k/v r = 16 17.9 -> 18.4, gate/up r = 32
// 235.9 -> 241.7; k/v r = 32 -3%), so there the panel is loaded in each column block's prologue as before.
template <int R_PAD>
constexpr bool panel_ahead() { return R_PAD > 32; }

// Warp roles (see the kernel): the first half of a program's warps are grad_xa warps, each owning 16 of the tile's
// rows and rank_span of the ranks (all of them on 8 warps, half on 16).
template <int R_PAD>
constexpr int role_warps() { return program_threads<R_PAD>() / 64; }
template <int R_PAD>
constexpr int rank_span() { return R_PAD / (role_warps<R_PAD>() / 4); }

// A grad_xa warp's float32 partial fragment in shared memory, as copy_fragment_async lays it out: per 8-column
// accumulator block, the top (row acc_row) and bottom (acc_row + 8) float2 of each lane, lanes consecutive.
template <int SPAN>
using FragmentStage = float2[SPAN / 8][2][32];
// The register scheme copies the fragments by cp.async (copy_fragment_async) rather than loading them into
// registers, at every R_PAD (the cp.async ring still loads them into registers: its commit groups count tile slots).
// Measured (benchmarks/NOTES.md #97, H100, the step with its sum): r = 16 -2.5% (k/v) to -7.3% (down), r = 32 -5.2%
// to -7.3%; at r = 64, copied at the tile's start like that, +0.5% (k/v) to +18% (gate/up), about one memory round
// trip a tile there: the hypothesis (not measured) is that the copy, waited before the first barrier, is not hidden
// at R_PAD 64. So there (fragment_ahead) each fragment is copied during the previous tile's products, into the other
// of two stages (#98, measured the same way: r = 64 -8.0% (q/o) to -8.8% (gate/up)); where a program has one row
// block, the next tile's fragment is the one the tile stores, so it is copied after that store and waited at the next
// tile's first barrier (small M only). The stages follow SharedTiles in the dynamic shared memory (4 KiB a program at
// R_PAD 16, 8 at 32, 2 x 16 at 64).
template <int R_PAD>
constexpr bool fragment_ahead() { return R_PAD > 32; }
template <int R_PAD>
constexpr size_t fragment_stage_bytes() {
  return (fragment_ahead<R_PAD>() ? 2 : 1) * role_warps<R_PAD>() * sizeof(FragmentStage<rank_span<R_PAD>()>);
}

template <typename T, int R_PAD>
struct alignas(128) SharedTiles {
  T tile[kTileRows][kTileCols + kPad];   // drop(dY) for the current (row block, column block)
  // B's rows of the current column block (and, where panel_ahead, of the next one: the two buffers alternate by
  // the column block's parity in the program).
  T panel[panel_ahead<R_PAD>() ? 2 : 1][kTileCols][R_PAD + kPad];
  T rows[kTileRows][R_PAD + kPad];       // xa's rows of the current row block
};

// The pipelined variant's shared memory: STAGES raw (then masked in place) dY tiles, one panel of B's rows and
// xa's rows as in SharedTiles. Dynamic shared memory (60 KiB at r <= 16 with three stages).
template <typename T, int R_PAD, int STAGES>
struct alignas(128) PipelinedTiles {
  T stage[STAGES][kTileRows][kTileCols + kPad];
  T panel[1][kTileCols][R_PAD + kPad];
  T rows[kTileRows][R_PAD + kPad];
};

// 16 bytes global -> shared without registers (sm_80+); zero-filled when !inside (src-size 0:
// nothing is read, `src` must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool inside) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(inside ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most PENDING of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }

// dY[m0 .. m0+63, c0 .. c0+127] into a shared stage by cp.async, zero outside the matrix. Thread
// t copies the vectors v * THREADS + t, the ones it masks (same order as load_tile).
template <typename T, int THREADS>
__device__ __forceinline__ void copy_tile_async(T (&dst)[kTileRows][kTileCols + kPad], const T* __restrict__ g,
                                                int64_t M, int64_t C, int64_t m0, int64_t c0) {
#pragma unroll
  for (int v = 0; v < vectors_per_thread<THREADS>(); ++v) {
    const int q = v * THREADS + threadIdx.x;
    const int row = q / kVectorsPerRow, col = (q % kVectorsPerRow) * kMaskGroup;
    const int64_t m = m0 + row, c = c0 + col;
    const bool inside = m < M && c < C;
    cp_async_16(&dst[row][col], inside ? g + m * C + c : g, inside);
  }
}

// dY[m0 .. m0+63, c0 .. c0+127] as 16-byte vectors, zero outside the matrix (C % 8 == 0).
template <typename T, int THREADS>
__device__ __forceinline__ void load_tile(uint4 (&data)[vectors_per_thread<THREADS>()], const T* __restrict__ g,
                                          int64_t M, int64_t C, int64_t m0, int64_t c0) {
#pragma unroll
  for (int v = 0; v < vectors_per_thread<THREADS>(); ++v) {
    const int q = v * THREADS + threadIdx.x;
    const int64_t m = m0 + q / kVectorsPerRow;
    const int64_t c = c0 + (q % kVectorsPerRow) * kMaskGroup;
    data[v] = (m < M && c < C) ? __ldcs(reinterpret_cast<const uint4*>(g + m * C + c)) : make_uint4(0, 0, 0, 0);
  }
}

// The thin operands (B's panel of kTileCols rows, xa's kTileRows rows) as 16-byte vectors of eight
// elements: a row-major (count, thin_cols) matrix with thin_cols % 8 == 0 and a 16-byte-aligned base (the
// launcher pads a copy where the caller's is not), read into ROWS x R_PAD, zero outside it. Vectors, not
// elements: the element loads (8 per thread per xa tile at R_PAD = 64, 16 per thread per panel, the panel's
// issued four at a time with each four waiting for the last) cost a round trip to memory per four and ~70
// instructions per thread per tile (SASS, sm_90; benchmarks/NOTES.md #79).
template <int ROWS, int R_PAD>
constexpr int thin_vectors_per_thread() {
  return (ROWS * R_PAD / kMaskGroup + program_threads<R_PAD>() - 1) / program_threads<R_PAD>();
}

template <typename T, int ROWS, int R_PAD>
__device__ __forceinline__ void load_thin(uint4 (&regs)[thin_vectors_per_thread<ROWS, R_PAD>()],
                                          const T* __restrict__ src, int64_t first, int64_t count, int thin_cols) {
  constexpr int kRowVectors = R_PAD / kMaskGroup;
#pragma unroll
  for (int j = 0; j < thin_vectors_per_thread<ROWS, R_PAD>(); ++j) {
    const int idx = j * program_threads<R_PAD>() + threadIdx.x, row = idx / kRowVectors;
    const int col = (idx % kRowVectors) * kMaskGroup;
    const bool inside = idx < ROWS * kRowVectors && first + row < count && col < thin_cols;
    regs[j] = inside ? __ldg(reinterpret_cast<const uint4*>(src + (first + row) * thin_cols + col))
                     : make_uint4(0, 0, 0, 0);
  }
}

// B's panel (kTileCols rows from `first`) into shared memory by cp.async: the vectors and zeros of load_thin, then
// store_thin, without holding registers until the copy lands (cp_async_wait, then a barrier, before it is read).
template <typename T, int ROWS, int R_PAD>
__device__ __forceinline__ void copy_thin_async(T (&dst)[ROWS][R_PAD + kPad], const T* __restrict__ src, int64_t first,
                                                int64_t count, int thin_cols) {
  constexpr int kRowVectors = R_PAD / kMaskGroup;
#pragma unroll
  for (int j = 0; j < thin_vectors_per_thread<ROWS, R_PAD>(); ++j) {
    const int idx = j * program_threads<R_PAD>() + threadIdx.x, row = idx / kRowVectors;
    const int col = (idx % kRowVectors) * kMaskGroup;
    if (idx < ROWS * kRowVectors) {
      const bool inside = first + row < count && col < thin_cols;
      cp_async_16(&dst[row][col], inside ? src + (first + row) * thin_cols + col : src, inside);
    }
  }
}

template <typename T, int ROWS, int R_PAD>
__device__ __forceinline__ void store_thin(T (&dst)[ROWS][R_PAD + kPad],
                                           const uint4 (&regs)[thin_vectors_per_thread<ROWS, R_PAD>()]) {
  constexpr int kRowVectors = R_PAD / kMaskGroup;
#pragma unroll
  for (int j = 0; j < thin_vectors_per_thread<ROWS, R_PAD>(); ++j) {
    const int idx = j * program_threads<R_PAD>() + threadIdx.x;
    if (idx < ROWS * kRowVectors) {
      *reinterpret_cast<uint4*>(&dst[idx / kRowVectors][(idx % kRowVectors) * kMaskGroup]) = regs[j];
    }
  }
}

// Programs per SM (of program_threads each): at ranks <= 16 two with the register scheme (<= 128 registers, no spill on
// sm_90; at 80 registers its one-tile-ahead vectors spill) and three with the cp.async ring (which
// holds no vectors in registers: 80 registers without a spill, ptxas -v, and 3 x 60 KiB of shared
// memory per SM), so that ~96 KiB per SM are in flight instead of 32 (NOTES.md #55); one above,
// whose accumulators would spill under either bound.
template <int R_PAD, int STAGES>
constexpr int programs_per_sm() { return R_PAD <= 16 ? (STAGES > 0 ? 3 : 2) : 1; }

// Two 16-bit elements times their keep flags (1 or 0, exact): bit 0 of `two_keeps` is the low
// element's, bit 1 the high one's. Times 0, not replaced by 0: a dropped NaN/Inf stays NaN (torch
// dropout, the reference). The 1 / (1 - p) of the kept ones is applied to the float32 sums instead, so dY
// is never rounded after scaling.
template <typename T>
__device__ __forceinline__ uint32_t keep_pair(uint32_t pair, uint32_t two_keeps) {
  constexpr uint32_t one = std::is_same_v<T, __nv_bfloat16> ? 0x3F80u : 0x3C00u;  // 1.0
  const uint32_t flags = ((two_keeps & 1u) ? one : 0u) | ((two_keeps & 2u) ? one << 16 : 0u);
  uint32_t out;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 product = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&pair),
                                           *reinterpret_cast<const __nv_bfloat162*>(&flags));
    out = *reinterpret_cast<const uint32_t*>(&product);
  } else {
    const __half2 product = __hmul2(*reinterpret_cast<const __half2*>(&pair), *reinterpret_cast<const __half2*>(&flags));
    out = *reinterpret_cast<const uint32_t*>(&product);
  }
  return out;
}

// One 16-byte vector (one Philox group) times its eight keep flags (TileKeeps' bits 0..7 for it).
template <typename T>
__device__ __forceinline__ void mask_vector(uint4& data, uint32_t keeps) {
  uint32_t* pairs = reinterpret_cast<uint32_t*>(&data);
#pragma unroll
  for (int w = 0; w < 4; ++w) pairs[w] = keep_pair<T>(pairs[w], keeps >> (2 * w));
}

// The keep flags of this thread's VECTORS vectors of the tile at (m0, c0), generated a few Philox rounds at a time
// (philox.h's philox4 in pieces: the same rounds on the same values) so that the rounds can sit between the
// products' MMAs (at R_PAD 32 and 64; at R_PAD 16 all ten rounds run at once in the tile's mask phase, #86): given
// the whole evaluation in one piece, ptxas put all of it ahead of the products (SASS, sm_90,
// nvcc 13.0), where it only moved the mask phase's integer burst past the barrier. Thread t's vector v is (row,
// column group) (q / kVectorsPerRow, q % kVectorsPerRow) with q = v * THREADS + t, Philox group
// (m0 + row) * C / 8 + c0 / 8 + q % kVectorsPerRow. Vectors past the matrix get flags too (their data is zero: the
// flags do not matter, and no memory is read for them). keeps(): vector v's eight flags in bits 8v .. 8v + 7.
template <int THREADS>
struct TileKeeps {
  static constexpr int VECTORS = vectors_per_thread<THREADS>();
  static_assert(VECTORS <= 4, "a tile's keep flags per thread fit one 32-bit word");
  uint32_t c[VECTORS][4];

  __device__ __forceinline__ void begin(uint64_t groups_per_row, int64_t m0, int64_t c0) {
    const uint64_t first_group = static_cast<uint64_t>(m0 + threadIdx.x / kVectorsPerRow) * groups_per_row +
                                 static_cast<uint64_t>(c0) / kMaskGroup + threadIdx.x % kVectorsPerRow;
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
      const uint64_t group = first_group + static_cast<uint64_t>(v * (THREADS / kVectorsPerRow)) * groups_per_row;
      c[v][0] = static_cast<uint32_t>(group), c[v][1] = static_cast<uint32_t>(group >> 32), c[v][2] = 0, c[v][3] = 0;
    }
  }
  // Rounds [first, end) of every vector's evaluation (philox4's rounds).
  __device__ __forceinline__ void rounds(uint64_t seed, int first, int end) {
#pragma unroll
    for (int round = first; round < end; ++round) {
#pragma unroll
      for (int v = 0; v < VECTORS; ++v) philox_round(c[v], seed, round);
    }
  }
  // The whole evaluation for the tile at (m0, c0): its flags, as keeps() gives them.
  __device__ __forceinline__ uint32_t of_tile(uint64_t groups_per_row, int64_t m0, int64_t c0, uint64_t seed,
                                              uint32_t threshold) {
    begin(groups_per_row, m0, c0);
    rounds(seed, 0, kPhiloxRounds);
    return keeps(threshold);
  }
  // Step `step` of `steps` (the products' K steps): its share of the ten rounds. The empty volatile asm keeps them
  // there in the PTX: without it the compiler moved every round out of the products' branches to after them (the
  // rounds do not depend on the products), one contiguous burst again (SASS, sm_90, nvcc 13.0). Volatile asm
  // statements keep their order in the PTX, and the products' ldmatrix and mma are volatile asm too; ptxas then
  // schedules the SASS itself, and keeps part of the rounds between the MMAs (R_PAD 64: 14 of 32 multiplies in one
  // branch, 2 of 36 in the other), the rest after the last MMA, still before the tile's end barrier.
  __device__ __forceinline__ void step(uint64_t seed, int step, int steps) {
    rounds(seed, step * kPhiloxRounds / steps, (step + 1) * kPhiloxRounds / steps);
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
      asm volatile("" : "+r"(c[v][0]), "+r"(c[v][1]), "+r"(c[v][2]), "+r"(c[v][3]));
    }
  }
  __device__ __forceinline__ uint32_t keeps(uint32_t threshold) const {
    uint32_t out = 0;
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        out |= (keep_low_half(c[v][w], threshold) ? 1u : 0u) << (8 * v + 2 * w);
        out |= (keep_high_half(c[v][w], threshold) ? 1u : 0u) << (8 * v + 2 * w + 1);
      }
    }
    return out;
  }
};

// A grad_xa warp: its 16 rows (from row `first_row`) and SPAN of the ranks (from `first_rank`)
// += tile rows (A, row-major) x panel (B).
template <typename T, int R_PAD, int SPAN, typename Step>
__device__ __forceinline__ void rows_grad_products(float (&rows_acc)[SPAN / 8][4],
                                                   const T (&tile)[kTileRows][kTileCols + kPad],
                                                   const T (&panel)[kTileCols][R_PAD + kPad], int first_row,
                                                   int first_rank, int lane, Step&& step) {
#pragma unroll
  for (int k = 0; k < kTileCols / 16; ++k) {
    step(k, kTileCols / 16);  // other work for the gaps of this K step's MMAs (R_PAD > 16: the next tile's keeps)
    uint32_t a[4];
    ldmatrix_x4(a, &tile[first_row + lane % 16][16 * k + 8 * (lane / 16)]);
#pragma unroll
    for (int nb2 = 0; nb2 < SPAN / 16; ++nb2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, &panel[16 * k + lane % 8 + 8 * ((lane / 8) % 2)][first_rank + 16 * nb2 + 8 * (lane / 16)]);
      mma_16816<T>(rows_acc[2 * nb2], a, b[0], b[1]);
      mma_16816<T>(rows_acc[2 * nb2 + 1], a, b[2], b[3]);
    }
  }
}

// A grad_B warp: its 16 CF rows (the tile's columns from `first_col`), all ranks, += tile^T (A: the
// tile through ldmatrix .trans) x xa rows (B).
template <typename T, int R_PAD, int CF, typename Step>
__device__ __forceinline__ void panel_grad_products(float (&panel_acc)[CF][R_PAD / 8][4],
                                                    const T (&tile)[kTileRows][kTileCols + kPad],
                                                    const T (&rows)[kTileRows][R_PAD + kPad], int first_col, int lane,
                                                    Step&& step) {
#pragma unroll
  for (int k = 0; k < kTileRows / 16; ++k) {
    step(k, kTileRows / 16);  // other work for the gaps of this K step's MMAs (R_PAD > 16: the next tile's keeps)
    uint32_t a[CF][4];
#pragma unroll
    for (int cf = 0; cf < CF; ++cf) {
      ldmatrix_x4_trans(a[cf], &tile[16 * k + lane % 8 + 8 * (lane / 16)][first_col + 16 * cf + 8 * ((lane / 8) % 2)]);
    }
#pragma unroll
    for (int nb2 = 0; nb2 < R_PAD / 16; ++nb2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, &rows[16 * k + lane % 8 + 8 * ((lane / 8) % 2)][16 * nb2 + 8 * (lane / 16)]);
#pragma unroll
      for (int cf = 0; cf < CF; ++cf) {
        mma_16816<T>(panel_acc[cf][2 * nb2], a[cf], b[0], b[1]);
        mma_16816<T>(panel_acc[cf][2 * nb2 + 1], a[cf], b[2], b[3]);
      }
    }
  }
}

// A 16-row accumulator fragment of SPAN columns of a float32 partial (rows of R_PAD), this lane's positions, into
// shared memory by cp.async (8 bytes each, through L1: .cg takes only 16), for read_fragment after a
// cp_async_wait by this thread. Why not load_fragment's registers: ptxas tracks every global load into registers
// of this loop on one scoreboard, so an instruction that waits for the fragment waits for every load issued since,
// the next tile's dY vectors and xa's rows among them: the products, which come after those are issued, started
// only once they had landed (SASS control bits, sm_90, nvcc 13.0: the first HMMA of the grad_xa warps, and at R_PAD 16
// the first LDSM of the grad_B warps, whose destination the fragment's load shared; benchmarks/NOTES.md #97).
// A copy into shared memory waits on its commit group instead, before the tile's first barrier.
template <int R_PAD, int SPAN>
__device__ __forceinline__ void copy_fragment_async(FragmentStage<SPAN>& dst, const float* part, int acc_col,
                                                    int lane) {
#pragma unroll
  for (int nb = 0; nb < SPAN / 8; ++nb) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(shared_address(&dst[nb][half][lane])),
                   "l"(part + 8 * R_PAD * half + 8 * nb + acc_col));
    }
  }
}

template <int SPAN>
__device__ __forceinline__ void read_fragment(float (&acc)[SPAN / 8][4], const FragmentStage<SPAN>& src, int lane) {
#pragma unroll
  for (int nb = 0; nb < SPAN / 8; ++nb) {
    const float2 top = src[nb][0][lane], bottom = src[nb][1][lane];
    acc[nb][0] = top.x, acc[nb][1] = top.y, acc[nb][2] = bottom.x, acc[nb][3] = bottom.y;
  }
}

// A 16-row accumulator fragment of SPAN columns from / to a float32 partial (rows of R_PAD), this
// lane's positions.
template <int R_PAD, int SPAN>
__device__ __forceinline__ void load_fragment(float (&acc)[SPAN / 8][4], const float* part, int acc_col) {
#pragma unroll
  for (int nb = 0; nb < SPAN / 8; ++nb) {
    const float2 top = *reinterpret_cast<const float2*>(part + 8 * nb + acc_col);
    const float2 bottom = *reinterpret_cast<const float2*>(part + 8 * R_PAD + 8 * nb + acc_col);
    acc[nb][0] = top.x, acc[nb][1] = top.y, acc[nb][2] = bottom.x, acc[nb][3] = bottom.y;
  }
}

template <int R_PAD, int SPAN>
__device__ __forceinline__ void store_fragment(float* part, const float (&acc)[SPAN / 8][4], int acc_col) {
#pragma unroll
  for (int nb = 0; nb < SPAN / 8; ++nb) {
    *reinterpret_cast<float2*>(part + 8 * nb + acc_col) = make_float2(acc[nb][0], acc[nb][1]);
    *reinterpret_cast<float2*>(part + 8 * R_PAD + 8 * nb + acc_col) = make_float2(acc[nb][2], acc[nb][3]);
  }
}

// STAGES: 0 = registers one tile ahead (dynamic shared memory, sizeof(SharedTiles) + fragment_stage_bytes); >= 2 =
// cp.async ring of STAGES shared tiles (dynamic shared memory, sizeof(PipelinedTiles)). See the file's head.
template <typename T, int R_PAD, int STAGES>
__global__ void __launch_bounds__(program_threads<R_PAD>(), programs_per_sm<R_PAD, STAGES>())
masked_grad_y_kernel(const T* __restrict__ g, const T* __restrict__ panel, const T* __restrict__ rows,
                     float* __restrict__ rows_grad_part, float* __restrict__ panel_grad_part,
                     const int64_t* __restrict__ seed_ptr, int64_t M, int64_t C, int thin_cols, int64_t M_pad, int64_t C_pad,
                     int blocks_m_per_group, int blocks_c_per_group, uint32_t threshold) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int N_BLOCKS = R_PAD / 8;  // 8-column accumulator blocks of one 16-row fragment
  constexpr bool kPipelined = STAGES > 0;
  // Warp roles: the first half of the warps sums grad_xa's rows, the second grad_B's. A grad_xa warp owns
  // 16 of the tile's rows and RANK_SPAN ranks (all of them on 8 warps, a half on 16); a grad_B warp owns
  // 16 CF of the tile's columns (32 on 8 warps, 16 on 16) and all ranks.
  constexpr int THREADS = program_threads<R_PAD>();
  constexpr int ROLE_WARPS = role_warps<R_PAD>();
  constexpr int RANK_SPAN = rank_span<R_PAD>();
  constexpr int PANEL_COLS = kTileCols / ROLE_WARPS;
  constexpr int CF = PANEL_COLS / 16;
  constexpr int VECTORS = vectors_per_thread<THREADS>();
  // What the roles assume: four 16-row blocks per tile, whole 16-rank MMA columns per grad_xa warp, whole
  // 16-column fragments per grad_B warp, and every dY vector owned by one thread (the thin operands' vectors
  // need not split evenly: load_thin guards its last round).
  static_assert(THREADS % 128 == 0 && ROLE_WARPS % 4 == 0, "grad_xa warps come in fours, one per 16-row block");
  static_assert(RANK_SPAN % 16 == 0 && PANEL_COLS % 16 == 0, "whole m16n8k16 fragments per warp");
  static_assert((kTileRows * kVectorsPerRow) % THREADS == 0, "a tile's vectors split evenly over the threads");
  using Tiles = std::conditional_t<kPipelined, PipelinedTiles<T, R_PAD, (kPipelined ? STAGES : 1)>,
                                   SharedTiles<T, R_PAD>>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  Tiles& s = *reinterpret_cast<Tiles*>(shared_bytes);
  // The register scheme: each grad_xa warp's copy of its partial fragment, after the tiles.
  constexpr bool kFragmentStaged = !kPipelined;
  constexpr bool kFragmentAhead = kFragmentStaged && fragment_ahead<R_PAD>();
  auto& fragment_stages =
      *reinterpret_cast<FragmentStage<RANK_SPAN>(*)[kFragmentAhead ? 2 : 1][ROLE_WARPS]>(shared_bytes + sizeof(Tiles));
  static_assert(!kFragmentStaged ||
                    sizeof(std::remove_reference_t<decltype(fragment_stages)>) == fragment_stage_bytes<R_PAD>(),
                "the launcher's shared memory holds the stages the kernel indexes");
  int fragment_parity = 0;  // kFragmentAhead: the stage this tile's fragment is in
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool rows_role = warp < ROLE_WARPS;
  const int role_warp = warp % ROLE_WARPS;
  const int first_row = 16 * (role_warp % 4), first_rank = RANK_SPAN * (role_warp / 4);  // a grad_xa warp's
  const int first_col = PANEL_COLS * role_warp;                                           // a grad_B warp's
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);  // read on the device: no host sync
  const int64_t m_blocks = (M + kTileRows - 1) / kTileRows;
  const int64_t c_blocks = (C + kTileCols - 1) / kTileCols;
  const int64_t mb_first = static_cast<int64_t>(blockIdx.x) * blocks_m_per_group;
  const int64_t mb_end = mb_first + blocks_m_per_group < m_blocks ? mb_first + blocks_m_per_group : m_blocks;
  const int64_t cb_first = static_cast<int64_t>(blockIdx.y) * blocks_c_per_group;
  const int64_t cb_end = cb_first + blocks_c_per_group < c_blocks ? cb_first + blocks_c_per_group : c_blocks;
  const bool want_rows_grad = rows_grad_part != nullptr;
  const bool want_panel_grad = panel_grad_part != nullptr;
  // This lane's accumulator positions (see the fragment layouts above).
  const int acc_row = lane / 4, acc_col = 2 * (lane % 4);
  const uint64_t groups_per_row = static_cast<uint64_t>(C) / kMaskGroup;
  // The keep flags of the tile being masked (`next` holds the counters of the tile they are made for). At R_PAD 32
  // and 64 each tile's products phase computes the next tile's (the next row block, or the next column block's
  // first): Philox is integer work with no memory operand, so in the products' basic block it can issue in the gaps
  // their ldmatrix and HMMA chains leave, where before the mask phase ran it alone between the loads' arrival and
  // the first barrier (stall_math and not_selected there: benchmarks/NOTES.md #79's ledger, #84). The program's
  // first tile computes its own here.
  // At R_PAD 16 each tile's own flags are made in its mask phase instead: two programs share an SM there, so one
  // program's mask already runs beside the other's products, and a tile ahead only added one unused evaluation per
  // program (+25% of the rounds at 4 tiles a program) and left the first tile's outside the products. Measured
  // (NOTES.md #86, H100, the step with its sum): k/v r = 16 19.5 -> 17.9 us in the mask phase; at R_PAD 32 the
  // mask phase lost (gate/up 236.2 -> 254.4 us, q/o and down +4%), so there the flags stay a tile ahead.
  constexpr bool kKeepsAhead = R_PAD > 16;
  TileKeeps<THREADS> next;
  uint32_t keeps = 0;
  if constexpr (kKeepsAhead) {
    keeps = next.of_tile(groups_per_row, mb_first * kTileRows, cb_first * kTileCols, seed, threshold);
  }

  // kPanelAhead (the register scheme at R_PAD 64, see panel_ahead): the next tile's vectors and xa's rows are loaded
  // a tile ahead across column blocks too, and B's next panel is copied beside a column block's last tile, so only
  // the program's first tile waits for its loads. Otherwise each column block's prologue loads its first tile, xa's
  // rows and its panel.
  constexpr bool kPanelAhead = !kPipelined && panel_ahead<R_PAD>();
  uint4 data[kPipelined ? 1 : VECTORS];  // STAGES == 0: the next tile's vectors
  uint4 rows_data[thin_vectors_per_thread<kTileRows, R_PAD>()];  // xa's rows of the next tile
  if constexpr (kPanelAhead) {
    // A program without a tile (masked_grad_y_grid.h makes none) leaves before the prologue's loads and copies: the
    // whole block, before any barrier, and with no cp.async group left in flight.
    if (mb_first >= mb_end || cb_first >= cb_end) return;
    load_tile<T, THREADS>(data, g, M, C, mb_first * kTileRows, cb_first * kTileCols);
    if (want_panel_grad) load_thin<T, kTileRows, R_PAD>(rows_data, rows, mb_first * kTileRows, M, thin_cols);
    if (want_rows_grad) copy_thin_async<T, kTileCols, R_PAD>(s.panel[0], panel, cb_first * kTileCols, C, thin_cols);
    cp_async_commit();
  }
  for (int64_t cb = cb_first; cb < cb_end; ++cb) {
    const int64_t c0 = cb * kTileCols;
    // The grad_B warps: grad_B rows c0 + first_col + 16 cf, all R_PAD columns.
    float panel_acc[CF][N_BLOCKS][4] = {};

    if constexpr (kPipelined) {
#pragma unroll
      for (int ahead = 0; ahead < STAGES - 1; ++ahead) {
        if (mb_first + ahead < mb_end) {
          copy_tile_async<T, THREADS>(s.stage[ahead], g, M, C, (mb_first + ahead) * kTileRows, c0);
        }
        cp_async_commit();  // one group per tile slot, empty or not: the wait below counts groups
      }
    } else if constexpr (!kPanelAhead) {
      load_tile<T, THREADS>(data, g, M, C, mb_first * kTileRows, c0);
    }
    // kPanelAhead: this block's panel was copied a tile ahead, into buffer (cb - cb_first) % 2. Otherwise it is
    // loaded after the first tile's loads, so that they fly together (one round trip to memory before the first
    // tile, not two); the last tile's barrier ended all reads of the old panel.
    const int panel_slot = kPanelAhead ? static_cast<int>((cb - cb_first) % 2) : 0;
    auto& panel_tile = s.panel[panel_slot];
    if constexpr (!kPanelAhead) {
      if (want_panel_grad) load_thin<T, kTileRows, R_PAD>(rows_data, rows, mb_first * kTileRows, M, thin_cols);
      if (want_rows_grad) {
        uint4 panel_data[thin_vectors_per_thread<kTileCols, R_PAD>()];
        load_thin<T, kTileCols, R_PAD>(panel_data, panel, c0, C, thin_cols);
        store_thin<T, kTileCols, R_PAD>(panel_tile, panel_data);
      }
    }
    for (int64_t mb = mb_first; mb < mb_end; ++mb) {
      const int64_t m0 = mb * kTileRows;
      const int slot = kPipelined ? static_cast<int>((mb - mb_first) % (kPipelined ? STAGES : 1)) : 0;
      auto& tile = [&]() -> T(&)[kTileRows][kTileCols + kPad] {
        if constexpr (kPipelined) return s.stage[slot]; else return s.tile;
      }();
      if constexpr (kPipelined) {
        // Refill the slot the previous tile used (its products ended at the last barrier).
        const int64_t ahead = mb + STAGES - 1;
        if (ahead < mb_end) {
          copy_tile_async<T, THREADS>(s.stage[(slot + STAGES - 1) % STAGES], g, M, C, ahead * kTileRows, c0);
        }
        cp_async_commit();
      }
      // The grad_xa warps: rows m0 + first_row of slice blockIdx.y, ranks from first_rank, started by the
      // group's first column block. kFragmentStaged copies it into shared memory (copy_fragment_async: the wait for
      // it is the commit group's, before the first barrier, not a scoreboard the next tile's loads share): here, first,
      // so that the copy passes under the mask phase, or (kFragmentAhead) during the previous tile's products.
      // Otherwise (the pipelined scheme, whose commit groups count tile slots) it is loaded into registers here.
      float* rows_part =
          rows_grad_part + (static_cast<int64_t>(blockIdx.y) * M_pad + m0 + first_row + acc_row) * R_PAD + first_rank;
      const bool rows_from_part = rows_role && want_rows_grad && cb != cb_first;
      float rows_acc[RANK_SPAN / 8][4] = {};
      if constexpr (kFragmentStaged && !kFragmentAhead) {
        if (rows_from_part) copy_fragment_async<R_PAD, RANK_SPAN>(fragment_stages[0][role_warp], rows_part, acc_col, lane);
        cp_async_commit();
      } else if constexpr (!kFragmentStaged) {
        if (rows_from_part) load_fragment<R_PAD, RANK_SPAN>(rows_acc, rows_part, acc_col);
      }
      // This tile's copies by this thread have landed (all groups but the STAGES - 1 newest): each
      // thread masks exactly the vectors it copied, so no barrier is needed before the mask.
      if constexpr (kPipelined) cp_async_wait<STAGES - 1>();
      if constexpr (!kKeepsAhead) keeps = next.of_tile(groups_per_row, m0, c0, seed, threshold);
#pragma unroll
      for (int v = 0; v < VECTORS; ++v) {
        const int q = v * THREADS + threadIdx.x;
        const int row = q / kVectorsPerRow, col = (q % kVectorsPerRow) * kMaskGroup;
        // Out of the matrix the vector is zero already and its mask does not matter.
        uint4* vector = reinterpret_cast<uint4*>(&tile[row][col]);
        if constexpr (kPipelined) {
          uint4 in_place = *vector;
          mask_vector<T>(in_place, keeps >> (8 * v));
          *vector = in_place;
        } else {
          mask_vector<T>(data[v], keeps >> (8 * v));
          *vector = data[v];
        }
      }
      if (want_panel_grad) store_thin<T, kTileRows, R_PAD>(s.rows, rows_data);
      // The register scheme: this thread's copy of its fragment has landed, and (kPanelAhead, a column block's first
      // tile) its copies of the block's panel; the barrier below shows every thread's panel copies to all.
      if constexpr (kFragmentStaged) cp_async_wait<0>();
      __syncthreads();
      // The next tile's loads fly while this one's products run (kPanelAhead: after a column block's last tile, the
      // next block's first tile and its panel, into the other buffer: its last reader, the previous block's last
      // tile, ended at that tile's end barrier).
      if (mb + 1 < mb_end) {
        if constexpr (!kPipelined) load_tile<T, THREADS>(data, g, M, C, m0 + kTileRows, c0);
        if (want_panel_grad) load_thin<T, kTileRows, R_PAD>(rows_data, rows, m0 + kTileRows, M, thin_cols);
      } else if constexpr (kPanelAhead) {
        if (cb + 1 < cb_end) {
          load_tile<T, THREADS>(data, g, M, C, mb_first * kTileRows, c0 + kTileCols);
          if (want_panel_grad) load_thin<T, kTileRows, R_PAD>(rows_data, rows, mb_first * kTileRows, M, thin_cols);
          if (want_rows_grad) {
            copy_thin_async<T, kTileCols, R_PAD>(s.panel[1 - panel_slot], panel, c0 + kTileCols, C, thin_cols);
          }
          cp_async_commit();
        }
      }
      // The next tile's keep flags, in each branch's own basic block beside its products (computed after the
      // program's last tile too, unused: a branch around them would put them in a block of their own).
      if constexpr (kKeepsAhead) {
        const int64_t next_m0 = mb + 1 < mb_end ? m0 + kTileRows : mb_first * kTileRows;
        const int64_t next_c0 = mb + 1 < mb_end ? c0 : c0 + kTileCols;
        next.begin(groups_per_row, next_m0, next_c0);
      }
      const auto step = [&](int k, int steps) {
        if constexpr (kKeepsAhead) next.step(seed, k, steps);
      };
      if (rows_role && want_rows_grad) {
        if constexpr (kFragmentStaged) {
          if (rows_from_part) read_fragment<RANK_SPAN>(rows_acc, fragment_stages[fragment_parity][role_warp], lane);
        }
        // kFragmentAhead: the next tile's fragment into the other stage, here so that its products hide the copy.
        // Where the program has one row block, the next tile's fragment is the one this tile stores: copied after it.
        const int64_t next_mb = mb + 1 < mb_end ? mb + 1 : mb_first, next_cb = mb + 1 < mb_end ? cb : cb + 1;
        const bool next_from_part = kFragmentAhead && next_cb < cb_end && next_cb != cb_first;
        const auto copy_next_fragment = [&] {
          float* next_part = rows_grad_part +
                             (static_cast<int64_t>(blockIdx.y) * M_pad + next_mb * kTileRows + first_row + acc_row) * R_PAD +
                             first_rank;
          copy_fragment_async<R_PAD, RANK_SPAN>(fragment_stages[1 - fragment_parity][role_warp], next_part, acc_col, lane);
          cp_async_commit();
        };
        if (next_from_part && next_mb != mb) copy_next_fragment();
        rows_grad_products<T, R_PAD, RANK_SPAN>(rows_acc, tile, panel_tile, first_row, first_rank, lane, step);
        store_fragment<R_PAD, RANK_SPAN>(rows_part, rows_acc, acc_col);
        if (next_from_part && next_mb == mb) {
          asm volatile("" ::: "memory");  // the copy reads what store_fragment just wrote: no reordering across it
          copy_next_fragment();
        }
      } else if (!rows_role && want_panel_grad) {
        panel_grad_products<T, R_PAD, CF>(panel_acc, tile, s.rows, first_col, lane, step);
      } else if constexpr (kKeepsAhead) {
        next.rounds(seed, 0, kPhiloxRounds);
      }
      if constexpr (kKeepsAhead) keeps = next.keeps(threshold);
      if constexpr (kFragmentAhead) fragment_parity ^= 1;
      __syncthreads();  // the tile and rows are rewritten next (and after a column block's last tile, without
                        // kPanelAhead, the panel)
    }
    if (!rows_role && want_panel_grad) {
#pragma unroll
      for (int cf = 0; cf < CF; ++cf) {
        float* part = panel_grad_part +
                      (static_cast<int64_t>(blockIdx.x) * C_pad + c0 + first_col + 16 * cf + acc_row) * R_PAD;
        store_fragment<R_PAD, R_PAD>(part, panel_acc[cf], acc_col);
      }
    }
  }
#else
  __trap();  // masked_grad_y_cuda_supports() refuses devices below sm_80
#endif
}

// One float32 partial to sum: out[i, :r] = scale * sum over slices of part[slice, i, :r_pad][:r].
template <typename T>
struct SlicedSum {
  const float* part;
  int slices;
  int64_t slice_stride;
  int64_t count;  // rows of out; 0: none
  T* out;
};

// sum_slices_kernel: each group of four neighbouring columns of a row (one 16-byte load per slice) is summed
// by 1, 2, 4 or 8 neighbouring lanes of a warp, each over every lanes-th slice, at most kSlicesPerLane of
// them loaded at once, then the lanes' sums are added by warp shuffles. Why:
// - loads in flight: one slice at a time, the SASS kept only 2-3 loads in flight per thread, so a thread
//   walking a partial of ~32 slices waited on a dozen or more round trips to memory: the launch took
//   10.3 us at k/v on an H100 (12-06 12:40, ncu), its DRAM at 18% of peak (benchmarks/NOTES.md #72);
// - four columns and lanes by the slice count: with one column per thread, a batch of 16 slices for every
//   partial and no split, grad_xa's partial at k/v r = 64 (4 slices) issued 16 four-byte loads per output,
//   12 of them repeats of the last slice, and grad_B's (32 slices at r = 64, 43 at r = 16) one thread per
//   output walked all of them, ~6 serial rounds of loads (ptxas keeps ~5 of a batch in flight) (NOTES.md #82).
constexpr int kColumnsPerThread = 4;
constexpr int kSlicesPerLane = 8;

// Lanes that share one group of four columns: the fewest (a power of two, at most 8) that leave each at
// most kSlicesPerLane slices where possible.
__host__ __device__ __forceinline__ int slice_lanes(int slices) {
  int lanes = 1;
  while (lanes < 8 && lanes * kSlicesPerLane < slices) lanes *= 2;
  return lanes;
}

// Groups of four columns in a row of r outputs.
__host__ __device__ __forceinline__ int column_groups(int r) { return (r + kColumnsPerThread - 1) / kColumnsPerThread; }

// sum_slices_kernel's work items for one partial, (row, four-column group, lane), padded to whole warps.
constexpr int kWarpLanes = 32;
__host__ __device__ __forceinline__ int64_t slice_items(int64_t count, int r, int slices) {
  const int64_t items = count * column_groups(r) * slice_lanes(slices);
  return (items + kWarpLanes - 1) / kWarpLanes * kWarpLanes;
}

// The float32 sums of four columns over `slices` slices `slice_stride` floats apart (value: the first
// slice's four; 16-byte aligned). The loads of a batch are independent (ptxas may interleave them with
// the adds: with a batch of 16 float4 it kept ~6 in flight, nvcc 13.0, hence batches of at most 8); the
// adds keep slice order. Past the last slice a load reads the last slice again and is not added: an
// unconditional load (a predicated one let ptxas keep only two in flight).
template <int BATCH>
__device__ __forceinline__ float4 sum_slice_columns(const float* value, int slices, int64_t slice_stride) {
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int first = 0; first < slices; first += BATCH) {
    float4 batch[BATCH];
#pragma unroll
    for (int k = 0; k < BATCH; ++k)
      batch[k] = *reinterpret_cast<const float4*>(value + min(first + k, slices - 1) * slice_stride);
#pragma unroll
    for (int k = 0; k < BATCH; ++k) {
      if (first + k < slices) {
        sum.x += batch[k].x;
        sum.y += batch[k].y;
        sum.z += batch[k].z;
        sum.w += batch[k].w;
      }
    }
  }
  return sum;
}

// Both partials of the kernel (grad_xa's and grad_B's) summed in one launch, each in a fixed order (a second
// launch cost ~2.4 us of device time at k/v and a host launch, benchmarks/NOTES.md #40's profile). Work
// items (row, four-column group, lane), lane fastest: [0, n_first) are `first`'s, the rest `second`'s, each
// range padded to whole warps, so that a group's lanes share a warp and every lane of a warp takes part in
// its shuffles (items past a partial's rows only do that). The host passes the partial with more slices as
// `first` (usually the longer per item, though the lane split evens most of that out), so that where the
// items outnumber the threads that run at once, its threads start in the first wave.
// Deterministic: lane l sums slices l, l + lanes, ... in order, and the shuffles add the lanes' sums as a
// fixed tree (lane 0's result is ((l0 + l1) + (l2 + l3)) + ... for every run).
template <typename T>
__global__ void sum_slices_kernel(SlicedSum<T> first, SlicedSum<T> second, int r, int r_pad, float scale) {
  const int groups_per_row = column_groups(r);
  const int lanes_first = slice_lanes(first.slices), lanes_second = slice_lanes(second.slices);
  const int64_t n_first = slice_items(first.count, r, first.slices);
  const int64_t n = n_first + slice_items(second.count, r, second.slices);
  // n and the stride are whole warps: a warp is in the loop or out of it as one, and in one partial.
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Field by field: a reference to either struct put both on the stack (80 bytes, ptxas -v).
    const bool in_first = idx < n_first;
    const float* part = in_first ? first.part : second.part;
    const int slices = in_first ? first.slices : second.slices;
    const int64_t slice_stride = in_first ? first.slice_stride : second.slice_stride;
    const int64_t count = in_first ? first.count : second.count;
    const int lanes = in_first ? lanes_first : lanes_second;
    T* out = in_first ? first.out : second.out;
    const int64_t item = in_first ? idx : idx - n_first;
    const int lane = static_cast<int>(item % lanes);
    const int64_t group = item / lanes;
    const int64_t row = group / groups_per_row;
    const int col = static_cast<int>(group % groups_per_row) * kColumnsPerThread;
    const bool active = row < count;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    if (active) {
      // r_pad is a multiple of 16 and the slices' strides of r_pad-wide rows: 16-byte aligned loads. The
      // columns past r (up to r_pad) are read and not written.
      const float* value = part + row * r_pad + col + lane * slice_stride;
      const int lane_slices = slices > lane ? (slices - lane + lanes - 1) / lanes : 0;
      sum = lane_slices <= 4 ? sum_slice_columns<4>(value, lane_slices, slice_stride * lanes)
                             : sum_slice_columns<kSlicesPerLane>(value, lane_slices, slice_stride * lanes);
    }
    for (int offset = 1; offset < lanes; offset *= 2) {  // lanes is the same across the warp
      sum.x += __shfl_xor_sync(0xffffffffu, sum.x, offset);
      sum.y += __shfl_xor_sync(0xffffffffu, sum.y, offset);
      sum.z += __shfl_xor_sync(0xffffffffu, sum.z, offset);
      sum.w += __shfl_xor_sync(0xffffffffu, sum.w, offset);
    }
    if (!active || lane != 0) continue;
    const float sums[kColumnsPerThread] = {sum.x, sum.y, sum.z, sum.w};
    T* dst = out + row * r + col;
    if (r % kColumnsPerThread == 0) {
      // Four 2-byte outputs as one 8-byte store: out is (count, r) from the caching allocator, so with r a
      // multiple of four every group starts on 8 bytes.
      alignas(8) T packed[kColumnsPerThread];
#pragma unroll
      for (int k = 0; k < kColumnsPerThread; ++k) packed[k] = from_float<T>(scale * sums[k]);
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(packed);
    } else {
#pragma unroll
      for (int k = 0; k < kColumnsPerThread; ++k)
        if (col + k < r) dst[k] = from_float<T>(scale * sums[k]);
    }
  }
}

// (a's out, b's out), each (count, r) (an empty (0,) tensor where not wanted), from the float32
// partials (slices, rows >= count, r_pad) in one launch.
template <typename T>
std::tuple<at::Tensor, at::Tensor> sum_slices(const at::Tensor& part_a, int64_t count_a, const at::Tensor& part_b,
                                              int64_t count_b, int r, int r_pad, double scale,
                                              const at::TensorOptions& options, cudaStream_t stream) {
  auto sliced = [&](const at::Tensor& part, int64_t count, at::Tensor& out) {
    if (!part.defined()) {
      out = at::empty({0}, options);
      return SlicedSum<T>{nullptr, 0, 0, 0, nullptr};
    }
    out = at::empty({count, r}, options);
    return SlicedSum<T>{part.data_ptr<float>(), static_cast<int>(part.size(0)), part.stride(0), count,
                        reinterpret_cast<T*>(out.data_ptr())};
  };
  at::Tensor out_a, out_b;
  const SlicedSum<T> a = sliced(part_a, count_a, out_a), b = sliced(part_b, count_b, out_b);
  const int64_t n = slice_items(a.count, r, a.slices) + slice_items(b.count, r, b.slices);
  if (n > 0) {
    const int threads = 256;  // whole warps, so that the kernel's grid stride is whole warps
    const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
    const bool a_longer = a.slices >= b.slices;
    sum_slices_kernel<T><<<blocks, threads, 0, stream>>>(a_longer ? a : b, a_longer ? b : a, r, r_pad,
                                                         static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out_a, out_b};
}

// Which load scheme the launches use (the kernel's STAGES): 0, the default, or kPipelineStages
// (LORA_EXT_MASKED_GRAD_Y_STAGES=3 at import, or set_masked_grad_y_stages).
constexpr int kPipelineStages = 3;
std::atomic<int> masked_grad_y_stages{[] {
  const char* env = std::getenv("LORA_EXT_MASKED_GRAD_Y_STAGES");
  return env != nullptr && std::string(env) == "3" ? kPipelineStages : 0;
}()};

// Which split of the work the launches use (masked_grad_y_grid.h): kBalanced, the default, or the
// first rule kSqrt (LORA_EXT_MASKED_GRAD_Y_GRID=sqrt at import, or set_masked_grad_y_grid_rule), kept
// for same-run A/B measurements.
std::atomic<int> masked_grad_y_grid_rule{[] {
  const char* env = std::getenv("LORA_EXT_MASKED_GRAD_Y_GRID");
  MaskedGradYGridRule rule = MaskedGradYGridRule::kBalanced;  // also for a value other than a rule's name
  if (env != nullptr) masked_grad_y_grid_rule_named(env, &rule);
  return static_cast<int>(rule);
}()};

template <typename T, int R_PAD>
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& g2, const at::Tensor& lora_B, const at::Tensor& xa,
                                       double scale, const at::Tensor& seed, double p, bool need_grad_xa,
                                       bool need_grad_B, int64_t max_partial_bytes) {
  const int64_t M = g2.size(0), C = g2.size(1);
  const int r = static_cast<int>(lora_B.size(1));
  const auto options = lora_B.options();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t m_blocks = masked_ceil_div(M, kTileRows), c_blocks = masked_ceil_div(C, kTileCols);
  const int64_t M_pad = m_blocks * kTileRows, C_pad = c_blocks * kTileCols;
  // About programs_per_sm programs per SM (what __launch_bounds__ fits), split between row and column
  // groups by masked_grad_y_grid.h (the fewest tiles in the longest program). The load scheme sets
  // the count, so at r <= 16 the two schemes split the sums differently (other bits, both
  // deterministic); so do the grid rule and the cap (dx's size when dx is wanted, from the op).
  const bool pipelined = masked_grad_y_stages.load() == kPipelineStages;
  constexpr size_t pipelined_shared = sizeof(PipelinedTiles<T, R_PAD, kPipelineStages>);
  auto pipelined_kernel = masked_grad_y_kernel<T, R_PAD, kPipelineStages>;
  int per_sm = programs_per_sm<R_PAD, 0>();
  if (pipelined) {
    // Once per device: over 48 KiB of dynamic shared memory needs the opt-in, and the most shared
    // memory the SM can carve out of its L1 lets three programs share one SM (H100/H200: 228 KiB);
    // then as many as this GPU holds at once, at most the launch bounds' count (an SM with less shared
    // memory, A100's 164 KiB: two, so a grid of one wave instead of one and a half).
    static PerDeviceCache resident_programs{};
    per_sm = once_per_device(resident_programs, g2.get_device(), [&] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(pipelined_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          pipelined_shared));
      C10_CUDA_CHECK(cudaFuncSetAttribute(pipelined_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          cudaSharedmemCarveoutMaxShared));
      int resident = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, pipelined_kernel, program_threads<R_PAD>(),
                                                                   pipelined_shared));
      return std::clamp(resident, 1, programs_per_sm<R_PAD, kPipelineStages>());
    });
  }
  const int64_t slots = static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const MaskedGradYGrid split = masked_grad_y_grid(static_cast<MaskedGradYGridRule>(masked_grad_y_grid_rule.load()),
                                                   M, C, R_PAD, slots, max_partial_bytes);
  const int64_t m_groups = split.m_groups, c_groups = split.c_groups;
  const int64_t blocks_m_per_group = split.blocks_m_per_group, blocks_c_per_group = split.blocks_c_per_group;

  // Both float32 partials in one allocation (one caching-allocator call fewer per backward).
  const int64_t rows_part_size = need_grad_xa ? c_groups * M_pad * R_PAD : 0;
  const int64_t panel_part_size = need_grad_B ? m_groups * C_pad * R_PAD : 0;
  const at::Tensor parts = at::empty({rows_part_size + panel_part_size}, options.dtype(at::kFloat));
  at::Tensor rows_part = need_grad_xa ? parts.narrow(0, 0, rows_part_size).view({c_groups, M_pad, R_PAD}) : at::Tensor();
  at::Tensor panel_part =
      need_grad_B ? parts.narrow(0, rows_part_size, panel_part_size).view({m_groups, C_pad, R_PAD}) : at::Tensor();
  // The kernel reads B and xa as 16-byte vectors (load_thin): rows of a multiple of eight elements from
  // 16-byte-aligned bases. Where r is not a multiple of eight, or a view starts off that alignment, it gets
  // zero-padded copies of R_PAD columns instead (N x R_PAD and M x R_PAD: M·r-sized, like the partials).
  at::Tensor B = lora_B.contiguous(), rows = xa.contiguous();
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  const bool vectors_fit = r % kMaskGroup == 0 && (!need_grad_xa || aligned(B)) && (!need_grad_B || aligned(rows));
  const int thin_cols = vectors_fit ? r : R_PAD;
  if (!vectors_fit) {
    const auto padded = [](const at::Tensor& t) {
      at::Tensor out = at::zeros({t.size(0), R_PAD}, t.options());
      out.narrow(1, 0, t.size(1)).copy_(t);
      return out;
    };
    if (need_grad_xa) B = padded(B);
    if (need_grad_B) rows = padded(rows);
  }
  const dim3 grid(static_cast<unsigned>(m_groups), static_cast<unsigned>(c_groups));
  auto launch = [&](auto kernel, size_t shared) {
    kernel<<<grid, program_threads<R_PAD>(), shared, stream>>>(
        reinterpret_cast<const T*>(g2.data_ptr()), reinterpret_cast<const T*>(B.data_ptr()),
        reinterpret_cast<const T*>(rows.data_ptr()), need_grad_xa ? rows_part.data_ptr<float>() : nullptr,
        need_grad_B ? panel_part.data_ptr<float>() : nullptr, seed.data_ptr<int64_t>(), M, C, thin_cols, M_pad, C_pad,
        static_cast<int>(blocks_m_per_group), static_cast<int>(blocks_c_per_group), dropout_threshold(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (pipelined) {
    launch(pipelined_kernel, pipelined_shared);
  } else {
    // Two panel buffers (NOTES.md #87) and two fragment stages (#98) take R_PAD = 64's shared memory past 48 KiB
    // (62 + 32 KiB): the opt-in, once per device. One program per SM there (its registers). The fragments' stages
    // (#97): 30 KiB a program at R_PAD 16, 40 at 32, both under 48 KiB. (What carve-out the driver picks was not
    // looked at: at R_PAD 16 before #97, ncu reported a 132 KiB shared memory configuration for two programs of 26 KiB.)
    constexpr size_t register_shared = sizeof(SharedTiles<T, R_PAD>) + fragment_stage_bytes<R_PAD>();
    auto register_kernel = masked_grad_y_kernel<T, R_PAD, 0>;
    if constexpr (register_shared > 48 * 1024) {
      static PerDeviceCache opted_in{};
      once_per_device(opted_in, g2.get_device(), [&] {
        C10_CUDA_CHECK(cudaFuncSetAttribute(register_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            register_shared));
        return 1;
      });
    }
    launch(register_kernel, register_shared);
  }
  // The kernel summed dY * keep; s and the kept elements' 1 / (1 - p) apply here, in float32.
  const double sum_scale = scale / (1.0 - p);
  return sum_slices<T>(rows_part, M, panel_part, C, r, R_PAD, sum_scale, options, stream);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> run_for_rank(const at::Tensor& g2, const at::Tensor& lora_B, const at::Tensor& xa,
                                                double scale, const at::Tensor& seed, double p, bool need_grad_xa,
                                                bool need_grad_B, int64_t max_partial_bytes) {
  // The same padding masked_grad_y_grid reports for (lora.cpp's binding).
  switch (masked_rank_pad(lora_B.size(1))) {
    case 16: return run<T, 16>(g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B, max_partial_bytes);
    case 32: return run<T, 32>(g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B, max_partial_bytes);
    default: return run<T, 64>(g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B, max_partial_bytes);
  }
}

}  // namespace

std::string set_masked_grad_y_grid_rule(const std::string& name) {
  MaskedGradYGridRule rule;
  TORCH_CHECK(masked_grad_y_grid_rule_named(name, &rule),
              "lora: set_masked_grad_y_grid_rule takes 'balanced' or 'sqrt', got '", name, "'");
  const int previous = masked_grad_y_grid_rule.exchange(static_cast<int>(rule));
  return masked_grad_y_grid_rule_name(static_cast<MaskedGradYGridRule>(previous));
}

int set_masked_grad_y_stages(int stages) {
  TORCH_CHECK(stages == 0 || stages == kPipelineStages, "lora: set_masked_grad_y_stages takes 0 or ", kPipelineStages,
              ", got ", stages);
  return masked_grad_y_stages.exchange(stages);
}

bool masked_grad_y_cuda_supports(const at::Tensor& g2, const at::Tensor& lora_B, const at::Tensor& xa) {
  static const bool disabled = [] {
    const char* env = std::getenv("LORA_EXT_NATIVE_GRAD_Y");
    return env != nullptr && std::string(env) == "0";
  }();
  if (disabled || !g2.is_cuda() || g2.dim() != 2 || !g2.is_contiguous()) return false;
  const auto dtype = g2.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || lora_B.scalar_type() != dtype || xa.scalar_type() != dtype) {
    return false;
  }
  if (lora_B.device() != g2.device() || xa.device() != g2.device()) return false;
  // Whole 16-byte vectors per row (one Philox group each), and bf16/f16 mma.sync (sm_80+).
  return g2.size(1) % kMaskGroup == 0 && reinterpret_cast<uintptr_t>(g2.data_ptr()) % 16 == 0 &&
         lora_B.size(1) <= kMaxRank && at::cuda::getDeviceProperties(g2.get_device())->major >= 8;
}

std::tuple<at::Tensor, at::Tensor> masked_grad_y_cuda(const at::Tensor& g2, const at::Tensor& lora_B,
                                                      const at::Tensor& xa, double scale, const at::Tensor& seed,
                                                      double p, bool need_grad_xa, bool need_grad_B,
                                                      int64_t max_partial_bytes) {
  TORCH_CHECK(masked_grad_y_cuda_supports(g2, lora_B, xa),
              "lora: masked_grad_y_cuda got inputs it does not support (masked_grad_y_cuda_supports)");
  const c10::cuda::CUDAGuard guard(g2.device());
  const int64_t M = g2.size(0), C = g2.size(1), r = lora_B.size(1);
  if (M == 0 || C == 0 || !(need_grad_xa || need_grad_B)) {
    // Nothing to read: sums over no elements are zero.
    return {need_grad_xa ? at::zeros({M, r}, lora_B.options()) : at::empty({0}, lora_B.options()),
            need_grad_B ? at::zeros({C, r}, lora_B.options()) : at::empty({0}, lora_B.options())};
  }
  if (g2.scalar_type() == at::kBFloat16) {
    return run_for_rank<__nv_bfloat16>(g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B, max_partial_bytes);
  }
  return run_for_rank<__half>(g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B, max_partial_bytes);
}

}  // namespace lora
