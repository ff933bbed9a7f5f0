// The Triton kernels are Python functions (lora_ext/kernels/triton_lora.py). When the
// extension is built with CUDA, the ops' CUDA kernels are C++ (csrc/cuda/lora_cuda.cu),
// so that the native path pays no Python on its hot path (decode calls take tens of
// microseconds); they reach the Triton implementation through these callbacks, which
// lora_ext/kernels/cuda_dispatch.py registers with lora_ext._C.set_triton_kernels.
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <tuple>

namespace lora {

bool triton_kernels_registered();

std::tuple<at::Tensor, at::Tensor> triton_linear_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> triton_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask);

}  // namespace lora
