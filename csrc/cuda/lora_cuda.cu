// CUDA kernels of the native path: the in-place dropout step of lora_aten.cpp.
// The GEMMs run on cuBLAS through ATen. The mask is philox.h's, so this path,
// the CPU kernels and the Triton kernels drop exactly the same elements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../checks.h"
#include "../lora_aten.h"
#include "../triton_bridge.h"
#include "../philox.h"

namespace lora {
namespace {

// Multiplying by 0 (rather than writing 0) lets a dropped NaN/Inf stay NaN, as in
// torch.nn.functional.dropout and lora_ext.reference (and the CPU kernel). The keep scale is in
// the element's math type: double for float64 (as the CPU kernel), float for the others.
template <typename scalar_t>
__device__ __forceinline__ scalar_t dropped(scalar_t value, bool keep, at::opmath_type<scalar_t> kept_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<acc_t>(value) * (keep ? kept_scale : acc_t(0)));
}

template <typename scalar_t>
__global__ void dropout_scale_kernel(scalar_t* __restrict__ data, int64_t n, const int64_t* __restrict__ seed_ptr,
                                     uint32_t threshold, at::opmath_type<scalar_t> kept_scale) {
  // The seed is read on the device, so the launch needs no host sync and is
  // safe to capture in a CUDA graph.
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t groups = (n + kMaskGroup - 1) / kMaskGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // 16-bit types: a group's eight elements are one 16-byte access when aligned.
  const bool vectors = sizeof(scalar_t) * kMaskGroup == 16 && reinterpret_cast<uintptr_t>(data) % 16 == 0;
  // One thread per group of eight consecutive elements: one Philox evaluation gives all
  // eight masks (philox.h).
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    bool keep[kMaskGroup];
    dropout_keep_group(seed, static_cast<uint64_t>(g), threshold, keep);
    scalar_t* group = data + kMaskGroup * g;
    if constexpr (sizeof(scalar_t) * kMaskGroup == 16) {
      if (vectors && kMaskGroup * g + kMaskGroup <= n) {
        uint4 packed = *reinterpret_cast<const uint4*>(group);
        scalar_t* values = reinterpret_cast<scalar_t*>(&packed);
#pragma unroll
        for (int k = 0; k < kMaskGroup; ++k) values[k] = dropped(values[k], keep[k], kept_scale);
        *reinterpret_cast<uint4*>(group) = packed;
        continue;
      }
    }
#pragma unroll
    for (int k = 0; k < kMaskGroup; ++k) {
      if (kMaskGroup * g + k < n) group[k] = dropped(group[k], keep[k], kept_scale);
    }
  }
}

}  // namespace

void dropout_scale_cuda_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const int threads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t groups = (n + kMaskGroup - 1) / kMaskGroup;
  const int blocks = static_cast<int>(std::min<int64_t>((groups + threads - 1) / threads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lora_dropout_scale_cuda", [&] {
    dropout_scale_kernel<scalar_t><<<blocks, threads, 0, stream>>>(t.data_ptr<scalar_t>(), n,
                                                                   seed.data_ptr<int64_t>(),
                                                                   dropout_threshold(p),
                                                                   static_cast<at::opmath_type<scalar_t>>(kept_scale));
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

// The two halves of the 'post' backward (lora_aten.h): the native path's kernels, whatever the
// backend rule says (the autograd calls them only where linear_backward would run natively).
std::tuple<at::Tensor, at::Tensor> post_dropout_grad_y_cuda(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                            const at::Tensor& xa, double scale, double dropout_p,
                                                            const at::Tensor& seed, std::array<bool, 2> output_mask,
                                                            int64_t partial_bytes_cap) {
  const c10::cuda::CUDAGuard guard(grad_y.device());
  return post_dropout_grad_y_aten(grad_y, lora_B, xa, scale, dropout_p, seed, output_mask, partial_bytes_cap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_from_grad_xa_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& grad_xa, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_backward_from_grad_xa_aten(grad_y, x, weight, lora_A, lora_B, grad_xa, output_mask);
}

TORCH_LIBRARY_IMPL(lora, CUDA, m) {
  m.impl("linear", &linear_forward_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
  m.impl("post_dropout_grad_y", &post_dropout_grad_y_cuda);
  m.impl("linear_backward_from_grad_xa", &linear_backward_from_grad_xa_cuda);
}

}  // namespace lora
