// The LoRA term of a forward with few tokens (decode, small batches), in one kernel:
//   xa = x A^T           (M x r, written out: the op returns it)
//   y += s * xa B^T      (y already holds x W^T + b from one cuBLAS call)
//
// Why: at M <= 16 the layer is host-bound on the H200 (the frozen base's GEMV reads W in
// ~9 us; the host needs ~14 us per nn.Linear call), so its time is the host's launch path.
// The general path spends three cuBLAS calls (~7 us of host time each there) and two
// allocations (x A^T, s xa B^T, then the base GEMM accumulating onto it); here the LoRA term
// is one plain kernel launch after the base GEMM (benchmarks/NOTES.md #24).
//
// The work is a few hundred KiB of loads, so its time is latency: it is spread so that each
// block issues about one round of loads per phase. Blocks come in clusters of C = 8 or 16 (sm_90
// thread-block clusters; 16 for long K, below); cluster (q, i) serves row group i (16 rows, one
// mma.sync row fragment):
// 1. block c of the cluster sums x A^T over K-slice c (its 8 warps split the slice; their
//    float32 partials are summed through shared memory);
// 2. after a cluster barrier every block adds the C slices' sums, in rank order, from the
//    blocks' shared memory (distributed shared memory), and rounds xa to T;
// 3. block c of cluster q adds s xa B^T to y's 256-column chunks C q + c, C q + c + C Q, ...
//    (warp w: 32 columns of a chunk, tensor cores, added to y in float32, rounded once).
// Each of the Q clusters of a row group repeats steps 1-2 (x and A come from L2 then), so that
// step 3 is spread over up to all SMs. First version (NOTES.md #24): every block summed x A^T
// over all of K itself, 14 us at 4096 x 4096 and 47 at 14336 x 4096 (rank 16), against 9 us
// for the two cuBLAS calls it replaces.
//
// Clusters of 16 (sm_90's non-portable size, where the driver says one fits) where 8 slices would
// leave a warp more than one round of loads in step 1 (K > 8192 at r <= 16, K > 4096 at r > 16:
// down's 14336 inputs). Measured on the H200 at 14336 x 4096 (NOTES.md #51; device time with the
// base GEMM, M = 1 / 16): r = 16 40.1 / 42.0 -> 38.5 / 40.7 us, r = 64 47.9 / 50.1 -> 45.5 / 47.3,
// where cuBLAS's composition takes 42.2 / 43.5 (back to back, host time included, the two are
// within 0.06 of each other and under 1.5x the base).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../lora_aten.h"
#include "mma_sm80.cuh"
#include "per_device.h"

namespace lora {
namespace {

constexpr int kRows = 16;  // rows of a row group: one mma row fragment
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunkCols = kWarps * 32;  // columns of one step-3 chunk: four 8-column tiles per warp
constexpr int kCluster = 8;              // blocks per cluster (the portable maximum)
constexpr int kWideCluster = 16;         // for long K: sm_90's largest (non-portable) cluster
constexpr int kMaxRank = 64;
constexpr int kPad = 8;  // 16 bytes: consecutive shared rows start in different banks

// k-steps (16 columns of x and A) whose loads are issued together before their mma.sync: as
// many as the registers allow without spilling (20 32-bit registers per step at r = 64, 8 at
// r = 16; ptxas -v).
template <int R_PAD>
constexpr int steps_in_flight() { return R_PAD <= 16 ? 8 : 4; }

template <typename T, int R_PAD>
struct SmallMShared {
  float partial[kWarps][kRows][R_PAD];  // each warp's share of this block's K-slice
  float slice_sum[kRows][R_PAD];        // this block's K-slice of x A^T, read by the whole cluster
  T xa[kRows][R_PAD + kPad];            // xa rounded to T: step 3's A operand
};

// Two consecutive 16-bit elements as one 32-bit register; zero when `valid` is false.
__device__ __forceinline__ uint32_t load_pair(const void* p, bool valid) {
  return valid ? __ldg(reinterpret_cast<const uint32_t*>(p)) : 0u;
}

// Elements j and j + 1 (j even) of a row of lora_B (N x r), zero past r: one 32-bit load when
// the rows are 4-byte aligned (`pairs`: r even), else two 16-bit ones.
template <typename T>
__device__ __forceinline__ uint32_t load_rank_pair(const T* row, int j, int r, bool pairs) {
  if (pairs) return j < r ? __ldg(reinterpret_cast<const uint32_t*>(row + j)) : 0u;
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

template <typename T, int R_PAD, int CLUSTER>
__global__ void __launch_bounds__(kThreads)
small_m_lora_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ y,
                    T* __restrict__ xa_out, int64_t M, int64_t K, int64_t N, int r, float scale, bool b_pairs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int N_BLOCKS = R_PAD / 8;
  constexpr int IN_FLIGHT = steps_in_flight<R_PAD>();
  __shared__ SmallMShared<T, R_PAD> s;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, pair_col = 2 * (lane % 4);  // fragment coordinates (mma_sm80.cuh)
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const bool row_lo = m0 + group < M, row_hi = m0 + group + 8 < M;

  // Step 1: k-steps [step_begin, step_end) of xa[m0 .. m0+15, :] = x A^T, warp w taking every
  // 8th. A operand (x, row-major): rows group and group + 8, columns pair_col and pair_col + 8.
  // B operand (A^T, i.e. rows of A): A row 8 nb + group, columns pair_col and pair_col + 8.
  {
    const int64_t k_steps = (K + 15) / 16;
    const int64_t steps_per_block = (k_steps + CLUSTER - 1) / CLUSTER;
    const int64_t step_begin = rank * steps_per_block;
    const int64_t step_end = step_begin + steps_per_block < k_steps ? step_begin + steps_per_block : k_steps;
    const T* x_lo = x + (m0 + group) * K;
    const T* x_hi = x_lo + 8 * K;
    float acc[N_BLOCKS][4] = {};
    for (int64_t first = step_begin + warp; first < step_end; first += static_cast<int64_t>(kWarps) * IN_FLIGHT) {
      uint32_t xf[IN_FLIGHT][4];
      uint32_t af[IN_FLIGHT][N_BLOCKS][2];
#pragma unroll
      for (int u = 0; u < IN_FLIGHT; ++u) {
        const int64_t step = first + static_cast<int64_t>(u) * kWarps;
        const int64_t k = step * 16 + pair_col;
        // K is even (small_m_forward_cuda_supports): a pair is wholly inside or outside.
        const bool in_lo = step < step_end && k < K, in_hi = step < step_end && k + 8 < K;
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
    for (int idx = threadIdx.x; idx < kRows * R_PAD; idx += kThreads) {
      const int row = idx / R_PAD, col = idx % R_PAD;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += s.partial[w][row][col];
      s.slice_sum[row][col] = sum;
    }
  }
  cluster.sync();  // every block's slice_sum is complete and visible to the cluster

  // Step 2: xa = the slices' sums in rank order (deterministic), rounded to T like a GEMM output.
  for (int idx = threadIdx.x; idx < kRows * R_PAD; idx += kThreads) {
    const int row = idx / R_PAD, col = idx % R_PAD;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) sum += cluster.map_shared_rank(&s.slice_sum[0][0], c)[idx];
    const T value = from_float<T>(sum);
    // Ranks past r are zero, not their sums: with an Inf in x those are Inf * 0 = NaN (A's padding
    // rows are zero), and step 3 would add NaN * 0 (B's padding) to every y of the row.
    s.xa[row][col] = col < r ? value : from_float<T>(0.f);
    if (xa_out != nullptr && blockIdx.x == 0 && m0 + row < M && col < r) xa_out[(m0 + row) * r + col] = value;
  }
  cluster.sync();  // no block leaves (freeing its shared memory) while others still read it; s.xa complete

  // Step 3: y[m0 .. m0+15, chunk] += scale * xa B^T for this block's chunks.
  uint32_t xa_frag[R_PAD / 16][4];
#pragma unroll
  for (int ks = 0; ks < R_PAD / 16; ++ks) ldmatrix_x4(xa_frag[ks], &s.xa[lane % 16][16 * ks + 8 * (lane / 16)]);
  const int64_t chunks = (N + kChunkCols - 1) / kChunkCols;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    // This warp's B fragments and y pairs first (one round of loads), then the products.
    uint32_t bf[4][R_PAD / 16][2];
    uint32_t y_pairs[4][2];
#pragma unroll
    for (int tile = 0; tile < 4; ++tile) {
      const int64_t n = chunk * kChunkCols + 32 * warp + 8 * tile + group;  // B operand column
      const T* b_row = B + n * r;
#pragma unroll
      for (int ks = 0; ks < R_PAD / 16; ++ks) {
        bf[tile][ks][0] = n < N ? load_rank_pair(b_row, 16 * ks + pair_col, r, b_pairs) : 0u;
        bf[tile][ks][1] = n < N ? load_rank_pair(b_row, 16 * ks + pair_col + 8, r, b_pairs) : 0u;
      }
      const int64_t col = chunk * kChunkCols + 32 * warp + 8 * tile + pair_col;  // N is even: pairs
      y_pairs[tile][0] = row_lo && col < N ? *reinterpret_cast<const uint32_t*>(y + (m0 + group) * N + col) : 0u;
      y_pairs[tile][1] = row_hi && col < N ? *reinterpret_cast<const uint32_t*>(y + (m0 + group + 8) * N + col) : 0u;
    }
#pragma unroll
    for (int tile = 0; tile < 4; ++tile) {
      float out[4] = {};
#pragma unroll
      for (int ks = 0; ks < R_PAD / 16; ++ks) mma_16816<T>(out, xa_frag[ks], bf[tile][ks][0], bf[tile][ks][1]);
      const int64_t col = chunk * kChunkCols + 32 * warp + 8 * tile + pair_col;
      if (col >= N) continue;
      if (row_lo) {
        *reinterpret_cast<uint32_t*>(y + (m0 + group) * N + col) =
            add_scaled_pair<T>(y_pairs[tile][0], out[0], out[1], scale);
      }
      if (row_hi) {
        *reinterpret_cast<uint32_t*>(y + (m0 + group + 8) * N + col) =
            add_scaled_pair<T>(y_pairs[tile][1], out[2], out[3], scale);
      }
    }
  }
#else
  __trap();  // small_m_forward_cuda_supports() refuses devices below sm_90
#endif
}

bool aligned_4(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0; }

// Step 1's rounds of loads per warp with `cluster` K-slices.
template <int R_PAD>
int64_t load_rounds(int64_t K, int64_t cluster) {
  const int64_t k_steps = (K + 15) / 16, steps_per_block = (k_steps + cluster - 1) / cluster;
  const int64_t steps_per_warp = (steps_per_block + kWarps - 1) / kWarps;
  return (steps_per_warp + steps_in_flight<R_PAD>() - 1) / steps_in_flight<R_PAD>();
}

cudaLaunchConfig_t launch_config(int64_t M, int64_t N, int cluster, cudaLaunchAttribute* cluster_dims) {
  const int64_t row_groups = (M + kRows - 1) / kRows;
  const int64_t chunks = (N + kChunkCols - 1) / kChunkCols;
  // Q clusters per row group: enough for one chunk per block where the SMs allow, as every
  // cluster repeats steps 1-2.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t clusters_per_group =
      std::clamp<int64_t>(sms / (cluster * row_groups), 1, (chunks + cluster - 1) / cluster);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster * clusters_per_group), static_cast<unsigned>(row_groups));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = at::cuda::getCurrentCUDAStream();
  cluster_dims[0].id = cudaLaunchAttributeClusterDimension;
  cluster_dims[0].val.clusterDim.x = cluster;
  cluster_dims[0].val.clusterDim.y = 1;
  cluster_dims[0].val.clusterDim.z = 1;
  config.attrs = cluster_dims;
  config.numAttrs = 1;
  return config;
}

// Whether this device runs the kernel in 16-block clusters (asked once per kernel and device: a
// non-portable size, so the driver is asked whether one fits rather than assumed).
template <typename T, int R_PAD>
bool wide_cluster_fits() {
  static PerDeviceCache fits{};
  return once_per_device(fits, at::cuda::current_device(), [] {
    auto* kernel = small_m_lora_kernel<T, R_PAD, kWideCluster>;
    int clusters = 0;
    cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (status == cudaSuccess) {
      cudaLaunchAttribute cluster_dims[1];
      cudaLaunchConfig_t config = launch_config(kRows, kChunkCols, kWideCluster, cluster_dims);
      status = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
    }
    // A refusal is an answer, not an error for the next launch to report: clear it (only ours: an
    // earlier pending error stays for its owner).
    if (status != cudaSuccess) (void)cudaGetLastError();
    return status == cudaSuccess && clusters > 0 ? 1 : 0;
  }) == 1;
}

template <typename T, int R_PAD>
int cluster_blocks(int64_t K) {
  return load_rounds<R_PAD>(K, kCluster) > 1 && wide_cluster_fits<T, R_PAD>() ? kWideCluster : kCluster;
}

template <typename T, int R_PAD>
void launch(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, at::Tensor& y, at::Tensor& xa,
            double scale) {
  const int64_t M = x2.size(0), K = x2.size(1), N = y.size(1);
  const int r = static_cast<int>(lora_A.size(0));
  const int cluster = cluster_blocks<T, R_PAD>(K);
  cudaLaunchAttribute cluster_dims[1];
  const cudaLaunchConfig_t config = launch_config(M, N, cluster, cluster_dims);
  auto* kernel =
      cluster == kWideCluster ? small_m_lora_kernel<T, R_PAD, kWideCluster> : small_m_lora_kernel<T, R_PAD, kCluster>;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, reinterpret_cast<const T*>(x2.data_ptr()),
                                    reinterpret_cast<const T*>(lora_A.data_ptr()),
                                    reinterpret_cast<const T*>(lora_B.data_ptr()), reinterpret_cast<T*>(y.data_ptr()),
                                    reinterpret_cast<T*>(xa.data_ptr()), M, K, N, r, static_cast<float>(scale),
                                    /*b_pairs=*/r % 2 == 0 && aligned_4(lora_B)));
}

// f(T(), std::integral_constant<int, R_PAD>()) for x2's 16-bit dtype T and the rank r padded to 16,
// 32 or 64: the one place the kernel's template arguments are chosen.
template <typename F>
auto with_dtype_and_rank_padding(const at::Tensor& x2, int64_t r, F&& f) {
  auto for_dtype = [&](auto dtype_tag) {
    if (r <= 16) return f(dtype_tag, std::integral_constant<int, 16>());
    if (r <= 32) return f(dtype_tag, std::integral_constant<int, 32>());
    return f(dtype_tag, std::integral_constant<int, 64>());
  };
  if (x2.scalar_type() == at::kBFloat16) return for_dtype(__nv_bfloat16());
  return for_dtype(__half());
}

}  // namespace

bool small_m_forward_cuda_supports(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  if (!x2.is_cuda() || x2.dim() != 2 || x2.size(0) > kSmallForwardMaxRows || x2.size(0) == 0) return false;
  const auto dtype = x2.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || lora_A.scalar_type() != dtype ||
      lora_B.scalar_type() != dtype) {
    return false;
  }
  if (!x2.is_contiguous() || !lora_A.is_contiguous() || !lora_B.is_contiguous()) return false;
  if (lora_A.device() != x2.device() || lora_B.device() != x2.device()) return false;
  // The op checks these shapes; this entry point is also called directly (lora_ext._C).
  if (lora_A.dim() != 2 || lora_B.dim() != 2 || lora_A.size(1) != x2.size(1) || lora_B.size(1) != lora_A.size(0)) {
    return false;
  }
  // x and A are read as pairs of elements (32-bit loads), y is updated in pairs.
  const int64_t K = x2.size(1), N = lora_B.size(0);
  return K % 2 == 0 && N % 2 == 0 && N > 0 && aligned_4(x2) && aligned_4(lora_A) && lora_A.size(0) <= kMaxRank &&
         at::cuda::getDeviceProperties(x2.get_device())->major >= 9;  // thread-block clusters
}

int64_t small_m_forward_cluster_blocks(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(small_m_forward_cuda_supports(x2, lora_A, lora_B),
              "lora: small_m_forward_cluster_blocks got inputs small_m_forward_cuda does not support");
  const c10::cuda::CUDAGuard guard(x2.device());
  const int64_t K = x2.size(1);
  return with_dtype_and_rank_padding(x2, lora_A.size(0), [&](auto dtype_tag, auto rank_padding) {
    return cluster_blocks<decltype(dtype_tag), decltype(rank_padding)::value>(K);
  });
}

void small_m_forward_cuda(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, at::Tensor& y,
                          at::Tensor& xa, double scale) {
  TORCH_CHECK(small_m_forward_cuda_supports(x2, lora_A, lora_B),
              "lora: small_m_forward_cuda got inputs it does not support (small_m_forward_cuda_supports)");
  TORCH_CHECK(y.device() == x2.device() && y.dim() == 2 && y.is_contiguous() && y.scalar_type() == x2.scalar_type() &&
                  y.size(0) == x2.size(0) && y.size(1) == lora_B.size(0) && aligned_4(y),
              "lora: small_m_forward_cuda needs y contiguous (M, N) in x's dtype, on x's device");
  TORCH_CHECK(xa.device() == x2.device() && xa.dim() == 2 && xa.is_contiguous() &&
                  xa.scalar_type() == x2.scalar_type() && xa.size(0) == x2.size(0) && xa.size(1) == lora_A.size(0),
              "lora: small_m_forward_cuda needs xa contiguous (M, r) in x's dtype, on x's device");
  const c10::cuda::CUDAGuard guard(x2.device());
  with_dtype_and_rank_padding(x2, lora_A.size(0), [&](auto dtype_tag, auto rank_padding) {
    launch<decltype(dtype_tag), decltype(rank_padding)::value>(x2, lora_A, lora_B, y, xa, scale);
  });
}

}  // namespace lora
