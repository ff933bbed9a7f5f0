// The lora operator family: every schema, in one place.
//
//   lora::linear            y = x W^T + b + LoRA(x), returns (y, xa) with xa = drop?(x) A^T (M x r),
//                           which autograd saves instead of anything activation-sized.
//   lora::linear_backward   every gradient of lora::linear, computing only those in output_mask
//                           (x, weight, bias, lora_A, lora_B); unneeded ones come back as empty tensors.
//
// Kernels: CPU in lora_cpu.cpp (C++), CUDA registered from Python (lora_ext/kernels/cuda_dispatch.py),
// which picks Triton or the native CUDA build of lora_aten.cpp; fake kernels and autograd in lora_ext/ops.py.
#include <torch/extension.h>

#include "lora_aten.h"

TORCH_LIBRARY(lora, m) {
  m.def(
      "linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
      "float dropout_p=0., str dropout_position=\"post\", Tensor? seed=None, str backend=\"auto\") "
      "-> (Tensor, Tensor)");
  m.def(
      "linear_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
      "float scale, float dropout_p, str dropout_position, Tensor? seed, bool[5] output_mask, "
      "str backend=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

bool built_with_cuda() {
#ifdef LORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// The Python module exposes the native (ATen + CUDA kernels) implementation, which
// the CUDA dispatcher in lora_ext/kernels/cuda_dispatch.py calls when it picks it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lora_ext C++/CUDA kernels; the ops are torch.ops.lora.*";
  module.def("has_cuda", &built_with_cuda, "True when the native CUDA kernels were compiled in");
  module.def(
      "linear_forward_native",
      [](const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
         const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
         const std::string& dropout_position, const c10::optional<at::Tensor>& seed) {
        return lora::linear_forward_aten(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_position,
                                         seed, "native");
      });
  module.def(
      "linear_backward_native",
      [](const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
         const std::string& dropout_position, const c10::optional<at::Tensor>& seed,
         const std::vector<bool>& output_mask) {
        TORCH_CHECK(output_mask.size() == 5, "lora: output_mask must have 5 entries");
        std::array<bool, 5> mask{output_mask[0], output_mask[1], output_mask[2], output_mask[3], output_mask[4]};
        return lora::linear_backward_aten(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p,
                                          dropout_position, seed, mask, "native");
      });
}
