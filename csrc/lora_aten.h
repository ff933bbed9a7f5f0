// The lora ops written as whole-tensor ATen calls. The same code runs on any
// device: cuBLAS/MKL do the GEMMs, and only the in-place dropout step has a
// per-device kernel (lora_cpu.cpp, cuda/lora_cuda.cu).
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <tuple>

namespace lora {

// t <- t * (keep(seed, i) ? kept_scale : 0) for every linear index i of the
// contiguous tensor t (the mask of philox.h); a dropped NaN/Inf stays NaN.
void dropout_scale_cpu_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale);
#ifdef LORA_WITH_CUDA
void dropout_scale_cuda_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale);
// The 'post' forward's LoRA term in one CUDA pass: bias + drop(term_scale * xa B^T) as a new
// (M, N) tensor in xa's dtype (cuda/lora_cuda.cu). Supported: 16-bit xa and lora_B of one
// dtype, rank <= 64, compute capability 8.0+, and not turned off (LORA_EXT_FUSED_POST_TERM=0,
// lora_ext._C.set_fused_post_term(False)).
bool masked_lora_term_supported(const at::Tensor& xa, const at::Tensor& lora_B);
at::Tensor masked_lora_term_cuda(const at::Tensor& xa, const at::Tensor& lora_B, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& seed, double p, double term_scale);
void set_fused_post_term(bool enabled);
#endif
void dropout_scale_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale);

std::tuple<at::Tensor, at::Tensor> linear_forward_aten(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, c10::string_view backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask,
    c10::string_view backend);

}  // namespace lora
