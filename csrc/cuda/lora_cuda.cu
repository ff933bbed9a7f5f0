// CUDA kernels of the native path: the in-place dropout step of lora_aten.cpp, and the
// 'post' forward's masked LoRA term. The GEMMs run on cuBLAS through ATen. The mask is
// philox.h's, so this path, the CPU kernels and the Triton kernels drop exactly the same
// elements.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "../checks.h"
#include "../lora_aten.h"
#include "../triton_bridge.h"
#include "../philox.h"

namespace lora {
namespace {

template <typename scalar_t>
__global__ void dropout_scale_kernel(scalar_t* __restrict__ data, int64_t n, const int64_t* __restrict__ seed_ptr,
                                     uint32_t threshold, float kept_scale) {
  // The seed is read on the device, so the launch needs no host sync and is
  // safe to capture in a CUDA graph.
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // One thread per group of four consecutive elements: one Philox evaluation gives all
  // four masks (philox.h).
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    uint32_t words[4];
    philox4(seed, static_cast<uint64_t>(g), words);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * g + k;
      if (i < n) {
        // Multiplying by 0 (rather than writing 0) lets a dropped NaN/Inf stay NaN, as in
        // torch.nn.functional.dropout and lora_ext.reference (and the CPU kernel).
        const bool keep = keep_word(words[k], threshold);
        data[i] = static_cast<scalar_t>(static_cast<acc_t>(data[i]) *
                                        (keep ? static_cast<acc_t>(kept_scale) : acc_t(0)));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// The 'post' forward's LoRA term, written once: y = bias + drop(term_scale * xa B^T).
// The ATen route writes xa B^T with cuBLAS, then masks it in place (dropout_scale_kernel)
// and adds the bias: three passes over the M x N term where this kernel makes one write
// (benchmarks/NOTES.md #14). The rank-r product runs on the tensor cores (WMMA, sm_80+),
// its float32 result goes through shared memory to the mask-scale-bias epilogue, which
// writes four consecutive columns per thread from one Philox evaluation.
// ---------------------------------------------------------------------------

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};

constexpr int kTermRows = 64;     // rows of y per block: 4 warps of 16 rows
constexpr int kTermCols = 64;     // columns of y per block: 4 WMMA tiles of 16 per warp
constexpr int kTermThreads = 128;
constexpr int kTermMaxRank = 64;  // shared memory: (64 + 64) x (64 + 8) 16-bit + 64 x 68 float
static_assert(kTermRows == kTermCols, "the operand tiles are loaded in one loop");
constexpr int kTermRankSkew = 8;  // row padding of the operand tiles (WMMA's ldm: a multiple of 8)
constexpr int kTermColSkew = 4;   // row padding of the float32 tile (ldm: a multiple of 4)

template <typename scalar_t, int RANK_PAD>
__global__ void __launch_bounds__(kTermThreads)
    masked_lora_term_kernel(const scalar_t* __restrict__ xa, int64_t stride_xa_m, int64_t stride_xa_r,
                            const scalar_t* __restrict__ lora_B, int64_t stride_b_n, int64_t stride_b_r,
                            const scalar_t* __restrict__ bias, int64_t stride_bias, scalar_t* __restrict__ y,
                            int64_t M, int64_t N, int64_t r, int64_t col_tiles, const int64_t* __restrict__ seed_ptr,
                            uint32_t threshold, float term_scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using wmma_t = typename WmmaType<scalar_t>::type;
  __shared__ __align__(32) wmma_t xa_tile[kTermRows][RANK_PAD + kTermRankSkew];
  __shared__ __align__(32) wmma_t b_tile[kTermCols][RANK_PAD + kTermRankSkew];
  __shared__ __align__(32) float term[kTermRows][kTermCols + kTermColSkew];

  const int64_t m0 = (static_cast<int64_t>(blockIdx.x) / col_tiles) * kTermRows;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) % col_tiles) * kTermCols;
  // Operand tiles, zero beyond the matrices and beyond rank r (the padding of RANK_PAD).
  for (int i = threadIdx.x; i < kTermRows * RANK_PAD; i += kTermThreads) {
    const int row = i / RANK_PAD, k = i % RANK_PAD;
    const int64_t m = m0 + row, n = n0 + row;
    const scalar_t a = (m < M && k < r) ? xa[m * stride_xa_m + k * stride_xa_r] : scalar_t(0);
    const scalar_t b = (n < N && k < r) ? lora_B[n * stride_b_n + k * stride_b_r] : scalar_t(0);
    xa_tile[row][k] = *reinterpret_cast<const wmma_t*>(&a);
    b_tile[row][k] = *reinterpret_cast<const wmma_t*>(&b);
  }
  __syncthreads();

  // Warp w: rows 16w..16w+15 of the tile, all 64 columns. B^T (r x N) is b_tile read column-major.
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTermCols / 16];
#pragma unroll
  for (int j = 0; j < kTermCols / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);
#pragma unroll
  for (int k = 0; k < RANK_PAD; k += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, wmma_t, wmma::row_major> a_frag;
    wmma::load_matrix_sync(a_frag, &xa_tile[16 * warp][k], RANK_PAD + kTermRankSkew);
#pragma unroll
    for (int j = 0; j < kTermCols / 16; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, wmma_t, wmma::col_major> b_frag;
      wmma::load_matrix_sync(b_frag, &b_tile[16 * j][k], RANK_PAD + kTermRankSkew);
      wmma::mma_sync(acc[j], a_frag, b_frag, acc[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kTermCols / 16; ++j) {
    wmma::store_matrix_sync(&term[16 * warp][16 * j], acc[j], kTermCols + kTermColSkew, wmma::mem_row_major);
  }
  __syncthreads();

  // Epilogue: four consecutive columns per thread per step; a warp writes two 128-byte rows.
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const bool groups_in_rows = N % 4 == 0;  // then the 4 elements of a Philox group share a row
  for (int g = threadIdx.x; g < kTermRows * (kTermCols / 4); g += kTermThreads) {
    const int row = g / (kTermCols / 4), col = 4 * (g % (kTermCols / 4));
    const int64_t m = m0 + row, n = n0 + col;
    if (m >= M || n >= N) continue;
    const int64_t index = m * N + n;
    const float4 product = *reinterpret_cast<const float4*>(&term[row][col]);
    const float products[4] = {product.x, product.y, product.z, product.w};
    uint32_t words[4];
    if (groups_in_rows) philox4(seed, static_cast<uint64_t>(index) >> 2, words);
    union {
      scalar_t values[4];
      uint2 bits;
    } out;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool inside = n + k < N;
      const bool keep = groups_in_rows ? keep_word(words[k], threshold)
                                       : inside && dropout_keep(seed, static_cast<uint64_t>(index + k), threshold);
      // Times 0, not replaced by 0: a dropped NaN/Inf stays NaN (as dropout_scale_kernel).
      float value = products[k] * (keep ? term_scale : 0.0f);
      if (bias != nullptr && inside) value += static_cast<float>(bias[(n + k) * stride_bias]);
      out.values[k] = static_cast<scalar_t>(value);
    }
    if (groups_in_rows) {
      // n % 4 == 0 and N % 4 == 0: the four elements are inside and 8-byte aligned.
      *reinterpret_cast<uint2*>(&y[index]) = out.bits;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (n + k < N) y[index + k] = out.values[k];
      }
    }
  }
#else
  __trap();  // launched only on devices of compute capability 8.0+ (masked_lora_term_supported)
#endif
}

std::atomic<bool> fused_post_term_enabled{[] {
  const char* env = std::getenv("LORA_EXT_FUSED_POST_TERM");
  return env == nullptr || std::string(env) != "0";
}()};

}  // namespace

void set_fused_post_term(bool enabled) { fused_post_term_enabled = enabled; }

bool masked_lora_term_supported(const at::Tensor& xa, const at::Tensor& lora_B) {
  if (!fused_post_term_enabled || !xa.is_cuda()) return false;
  const auto dtype = xa.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || lora_B.scalar_type() != dtype) return false;
  if (lora_B.size(1) > kTermMaxRank) return false;
  return at::cuda::getDeviceProperties(xa.device().index())->major >= 8;
}

at::Tensor masked_lora_term_cuda(const at::Tensor& xa, const at::Tensor& lora_B, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& seed, double p, double term_scale) {
  TORCH_INTERNAL_ASSERT(masked_lora_term_supported(xa, lora_B));
  const int64_t M = xa.size(0), r = xa.size(1), N = lora_B.size(0);
  const c10::cuda::CUDAGuard guard(xa.device());
  at::Tensor y = at::empty({M, N}, xa.options());
  if (M == 0 || N == 0) return y;
  const int64_t col_tiles = (N + kTermCols - 1) / kTermCols;
  const int64_t tiles = ((M + kTermRows - 1) / kTermRows) * col_tiles;
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "lora: too many tokens for the LoRA term kernel");
  const at::Tensor* bias_t = bias.has_value() ? &*bias : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(xa.scalar_type(), "lora_masked_lora_term_cuda", [&] {
    auto launch = [&](auto rank_pad) {
      masked_lora_term_kernel<scalar_t, decltype(rank_pad)::value><<<static_cast<int>(tiles), kTermThreads, 0, stream>>>(
          xa.data_ptr<scalar_t>(), xa.stride(0), xa.stride(1), lora_B.data_ptr<scalar_t>(), lora_B.stride(0),
          lora_B.stride(1), bias_t ? bias_t->data_ptr<scalar_t>() : nullptr, bias_t ? bias_t->stride(0) : 0,
          y.data_ptr<scalar_t>(), M, N, r, col_tiles, seed.data_ptr<int64_t>(), dropout_threshold(p),
          static_cast<float>(term_scale));
    };
    if (r <= 16) {
      launch(std::integral_constant<int, 16>());
    } else if (r <= 32) {
      launch(std::integral_constant<int, 32>());
    } else {
      launch(std::integral_constant<int, 64>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

void dropout_scale_cuda_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const int threads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t groups = (n + 3) / 4;
  const int blocks = static_cast<int>(std::min<int64_t>((groups + threads - 1) / threads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lora_dropout_scale_cuda", [&] {
    dropout_scale_kernel<scalar_t><<<blocks, threads, 0, stream>>>(t.data_ptr<scalar_t>(), n,
                                                                   seed.data_ptr<int64_t>(),
                                                                   dropout_threshold(p),
                                                                   static_cast<float>(kept_scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which implementation runs a CUDA call. The op's `backend` argument wins when it is
// "triton" or "native"; with "auto", the environment variable LORA_EXT_BACKEND does; else
// native, which measured faster than the Triton kernels at every benchmarked shape on the
// H200 (benchmarks/RESULTS.md). "triton" without triton installed falls back to native.
bool use_triton(c10::string_view backend) {
  std::string choice(backend);
  if (choice == "auto") {
    const char* env = std::getenv("LORA_EXT_BACKEND");
    choice = env != nullptr ? env : "auto";
    TORCH_CHECK_VALUE(choice == "auto" || choice == "triton" || choice == "native",
                      "lora: LORA_EXT_BACKEND must be auto, triton or native, got '", choice, "'");
  }
  return choice == "triton" && triton_kernels_registered();
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, c10::string_view backend) {
  check_backend(backend);
  if (use_triton(backend)) {
    return triton_linear_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_forward_aten(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position, seed, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask,
    c10::string_view backend) {
  check_backend(backend);
  if (use_triton(backend)) {
    return triton_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed,
                                  output_mask);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_backward_aten(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p, dropout_position, seed,
                              output_mask, backend);
}

TORCH_LIBRARY_IMPL(lora, CUDA, m) {
  m.impl("linear", &linear_forward_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
}

}  // namespace lora
