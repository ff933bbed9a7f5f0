// The LoRA term of a forward with few tokens (decode, small batches), in one kernel:
//   xa = x A^T           (M x r, written out: the op returns it)
//   y += s * xa B^T      (y already holds x W^T + b from one cuBLAS call)
//
// Why: at M <= 16 the layer is host-bound on the H200 (the frozen base's GEMV reads W in
// ~8 us; the host needs ~20 us per nn.Linear call), so its time is the host's launch path.
// The general path spends three cuBLAS calls and two allocations (x A^T, s xa B^T, then the
// base GEMM accumulating onto it); here the LoRA term is one plain kernel launch after the
// base GEMM (benchmarks/NOTES.md #24).
//
// Work split: program (j, i) owns row group i (16 rows, one mma.sync row fragment) and the
// 256-column chunks of column group j. Every program first computes its 16 rows of xa
// (16 x K times K x r: ~1 M multiply-adds at K = 4096, r = 16; the 8 warps split K and their
// float32 partials are summed through shared memory), so xa never makes a round trip
// through memory between two kernels; x and A come from L2 after the first program. Then
// each warp owns 32 columns of every chunk: (16 x r) times (r x 32) on tensor cores, added
// to y in float32 and rounded once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "../lora_aten.h"
#include "mma_sm80.cuh"

namespace lora {
namespace {

constexpr int kRows = 16;  // rows of one program: one mma row fragment
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunkCols = kWarps * 32;  // columns per pass of phase 2: four 8-column tiles per warp
constexpr int kMaxRank = 64;
constexpr int kPad = 8;  // 16 bytes: consecutive shared rows start in different banks

// k-steps (16 columns of x and A) whose loads are issued together before their mma.sync: as
// many as the registers allow (20 32-bit registers per step at r = 64, 8 at r = 16).
template <int R_PAD>
constexpr int steps_in_flight() { return R_PAD <= 16 ? 8 : (R_PAD <= 32 ? 4 : 2); }

template <typename T, int R_PAD>
struct SmallMShared {
  float partial[kWarps][kRows][R_PAD];  // each warp's share of xa (its part of the K sum)
  T xa[kRows][R_PAD + kPad];            // xa rounded to T: phase 2's A operand
};

// Two consecutive 16-bit elements as one 32-bit register; zero when `valid` is false.
__device__ __forceinline__ uint32_t load_pair(const void* p, bool valid) {
  return valid ? __ldg(reinterpret_cast<const uint32_t*>(p)) : 0u;
}

// Two elements of a row of lora_B (N x r, r possibly odd: no 32-bit alignment), zero past r.
template <typename T>
__device__ __forceinline__ uint32_t load_rank_pair(const T* row, int j, int r) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  const uint32_t lo = j < r ? __ldg(bits + j) : 0u;
  const uint32_t hi = j + 1 < r ? __ldg(bits + j + 1) : 0u;
  return lo | (hi << 16);
}

template <typename T>
__device__ __forceinline__ uint32_t add_scaled_pair(uint32_t pair, float a, float b, float scale) {
  const T* values = reinterpret_cast<const T*>(&pair);
  const T sums[2] = {from_float<T>(to_float(values[0]) + scale * a), from_float<T>(to_float(values[1]) + scale * b)};
  return *reinterpret_cast<const uint32_t*>(sums);
}

template <typename T, int R_PAD>
__global__ void __launch_bounds__(kThreads)
small_m_lora_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ y,
                    T* __restrict__ xa_out, int64_t M, int64_t K, int64_t N, int r, float scale,
                    int chunks_per_program) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int N_BLOCKS = R_PAD / 8;
  constexpr int IN_FLIGHT = steps_in_flight<R_PAD>();
  __shared__ SmallMShared<T, R_PAD> s;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, pair_col = 2 * (lane % 4);  // fragment coordinates (mma_sm80.cuh)
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;

  // Phase 1: this warp's k-steps warp, warp + 8, ... of xa[m0 .. m0+15, :] = x A^T.
  // A operand (x, row-major): rows group and group + 8, columns pair_col and pair_col + 8.
  // B operand (A^T, i.e. rows of A): A row 8 nb + group, columns pair_col and pair_col + 8.
  const bool row_lo = m0 + group < M, row_hi = m0 + group + 8 < M;
  const T* x_lo = x + (m0 + group) * K;
  const T* x_hi = x_lo + 8 * K;
  float acc[N_BLOCKS][4] = {};
  const int64_t k_steps = (K + 15) / 16;
  for (int64_t first = warp; first < k_steps; first += static_cast<int64_t>(kWarps) * IN_FLIGHT) {
    uint32_t xf[IN_FLIGHT][4];
    uint32_t af[IN_FLIGHT][N_BLOCKS][2];
#pragma unroll
    for (int u = 0; u < IN_FLIGHT; ++u) {
      const int64_t k = (first + static_cast<int64_t>(u) * kWarps) * 16 + pair_col;
      // K is even (small_m_forward_cuda_supports): a pair is wholly inside or outside.
      const bool in_lo = k < K, in_hi = k + 8 < K;
      xf[u][0] = load_pair(x_lo + k, row_lo && in_lo);
      xf[u][1] = load_pair(x_hi + k, row_hi && in_lo);
      xf[u][2] = load_pair(x_lo + k + 8, row_lo && in_hi);
      xf[u][3] = load_pair(x_hi + k + 8, row_hi && in_hi);
#pragma unroll
      for (int nb = 0; nb < N_BLOCKS; ++nb) {
        const int j = 8 * nb + group;
        const T* a_row = A + static_cast<int64_t>(j) * K;
        af[u][nb][0] = load_pair(a_row + k, j < r && in_lo);
        af[u][nb][1] = load_pair(a_row + k + 8, j < r && in_hi);
      }
    }
#pragma unroll
    for (int u = 0; u < IN_FLIGHT; ++u) {
#pragma unroll
      for (int nb = 0; nb < N_BLOCKS; ++nb) mma_16816<T>(acc[nb], xf[u], af[u][nb][0], af[u][nb][1]);
    }
  }
#pragma unroll
  for (int nb = 0; nb < N_BLOCKS; ++nb) {
    s.partial[warp][group][8 * nb + pair_col] = acc[nb][0];
    s.partial[warp][group][8 * nb + pair_col + 1] = acc[nb][1];
    s.partial[warp][group + 8][8 * nb + pair_col] = acc[nb][2];
    s.partial[warp][group + 8][8 * nb + pair_col + 1] = acc[nb][3];
  }
  __syncthreads();
  // The warps' partials summed in a fixed order (deterministic), rounded to T like a GEMM output.
  for (int idx = threadIdx.x; idx < kRows * R_PAD; idx += kThreads) {
    const int row = idx / R_PAD, col = idx % R_PAD;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += s.partial[w][row][col];
    const T value = from_float<T>(sum);
    s.xa[row][col] = value;
    if (xa_out != nullptr && blockIdx.x == 0 && m0 + row < M && col < r) xa_out[(m0 + row) * r + col] = value;
  }
  __syncthreads();

  // Phase 2: y[m0 .. m0+15, chunk] += scale * xa B^T, warp `warp` owning 32 columns per chunk.
  uint32_t xa_frag[R_PAD / 16][4];
#pragma unroll
  for (int ks = 0; ks < R_PAD / 16; ++ks) ldmatrix_x4(xa_frag[ks], &s.xa[lane % 16][16 * ks + 8 * (lane / 16)]);
  const int64_t chunks = (N + kChunkCols - 1) / kChunkCols;
  const int64_t chunk_first = static_cast<int64_t>(blockIdx.x) * chunks_per_program;
  const int64_t chunk_end = chunk_first + chunks_per_program < chunks ? chunk_first + chunks_per_program : chunks;
  for (int64_t chunk = chunk_first; chunk < chunk_end; ++chunk) {
    float out[4][4] = {};
#pragma unroll
    for (int tile = 0; tile < 4; ++tile) {
      const int64_t n = chunk * kChunkCols + 32 * warp + 8 * tile + group;  // B operand column
      const T* b_row = B + n * r;
#pragma unroll
      for (int ks = 0; ks < R_PAD / 16; ++ks) {
        const int j = 16 * ks + pair_col;
        const uint32_t b0 = n < N ? load_rank_pair(b_row, j, r) : 0u;
        const uint32_t b1 = n < N ? load_rank_pair(b_row, j + 8, r) : 0u;
        mma_16816<T>(out[tile], xa_frag[ks], b0, b1);
      }
    }
#pragma unroll
    for (int tile = 0; tile < 4; ++tile) {
      const int64_t col = chunk * kChunkCols + 32 * warp + 8 * tile + pair_col;  // N is even: pairs
      if (col >= N) continue;
      if (row_lo) {
        uint32_t* p = reinterpret_cast<uint32_t*>(y + (m0 + group) * N + col);
        *p = add_scaled_pair<T>(*p, out[tile][0], out[tile][1], scale);
      }
      if (row_hi) {
        uint32_t* p = reinterpret_cast<uint32_t*>(y + (m0 + group + 8) * N + col);
        *p = add_scaled_pair<T>(*p, out[tile][2], out[tile][3], scale);
      }
    }
  }
#else
  __trap();  // small_m_forward_cuda_supports() refuses devices below sm_80
#endif
}

template <typename T, int R_PAD>
void launch(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, at::Tensor& y, at::Tensor& xa,
            double scale) {
  const int64_t M = x2.size(0), K = x2.size(1), N = y.size(1);
  const int r = static_cast<int>(lora_A.size(0));
  const int64_t row_groups = (M + kRows - 1) / kRows;
  const int64_t chunks = (N + kChunkCols - 1) / kChunkCols;
  // About one program per SM in all: every program recomputes its rows of xa, so more
  // programs than SMs would only repeat that work in a second wave.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t column_groups_wanted = std::clamp<int64_t>(sms / row_groups, 1, chunks);
  const int64_t chunks_per_program = (chunks + column_groups_wanted - 1) / column_groups_wanted;
  const int64_t column_groups = (chunks + chunks_per_program - 1) / chunks_per_program;
  const dim3 grid(static_cast<unsigned>(column_groups), static_cast<unsigned>(row_groups));
  small_m_lora_kernel<T, R_PAD><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), reinterpret_cast<const T*>(lora_A.data_ptr()),
      reinterpret_cast<const T*>(lora_B.data_ptr()), reinterpret_cast<T*>(y.data_ptr()),
      reinterpret_cast<T*>(xa.data_ptr()), M, K, N, r, static_cast<float>(scale),
      static_cast<int>(chunks_per_program));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_rank(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, at::Tensor& y,
                     at::Tensor& xa, double scale) {
  const int64_t r = lora_A.size(0);
  if (r <= 16) return launch<T, 16>(x2, lora_A, lora_B, y, xa, scale);
  if (r <= 32) return launch<T, 32>(x2, lora_A, lora_B, y, xa, scale);
  return launch<T, 64>(x2, lora_A, lora_B, y, xa, scale);
}

bool aligned_4(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0; }

}  // namespace

bool small_m_forward_cuda_supports(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  if (!x2.is_cuda() || x2.dim() != 2 || x2.size(0) > kSmallForwardMaxRows || x2.size(0) == 0) return false;
  const auto dtype = x2.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || lora_A.scalar_type() != dtype ||
      lora_B.scalar_type() != dtype) {
    return false;
  }
  if (!x2.is_contiguous() || !lora_A.is_contiguous() || !lora_B.is_contiguous()) return false;
  // x and A are read as pairs of elements (32-bit loads), y is updated in pairs.
  const int64_t K = x2.size(1), N = lora_B.size(0);
  return K % 2 == 0 && N % 2 == 0 && N > 0 && aligned_4(x2) && aligned_4(lora_A) && lora_A.size(0) <= kMaxRank &&
         at::cuda::getDeviceProperties(x2.get_device())->major >= 8;
}

void small_m_forward_cuda(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, at::Tensor& y,
                          at::Tensor& xa, double scale) {
  TORCH_CHECK(small_m_forward_cuda_supports(x2, lora_A, lora_B),
              "lora: small_m_forward_cuda got inputs it does not support (small_m_forward_cuda_supports)");
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == x2.scalar_type() && y.size(0) == x2.size(0) &&
                  y.size(1) == lora_B.size(0) && aligned_4(y),
              "lora: small_m_forward_cuda needs y contiguous (M, N) in x's dtype");
  TORCH_CHECK(xa.is_contiguous() && xa.scalar_type() == x2.scalar_type() && xa.size(0) == x2.size(0) &&
                  xa.size(1) == lora_A.size(0),
              "lora: small_m_forward_cuda needs xa contiguous (M, r) in x's dtype");
  const c10::cuda::CUDAGuard guard(x2.device());
  if (x2.scalar_type() == at::kBFloat16) return launch_for_rank<__nv_bfloat16>(x2, lora_A, lora_B, y, xa, scale);
  launch_for_rank<__half>(x2, lora_A, lora_B, y, xa, scale);
}

}  // namespace lora
