// The lora operator family: every schema, in one place.
//
//   lora::linear            y = x W^T + b + LoRA(x), returns (y, xa) with xa = drop?(x) A^T (M x r),
//                           which autograd saves instead of anything activation-sized.
//   lora::linear_backward   every gradient of lora::linear, computing only those in output_mask
//                           (x, weight, bias, lora_A, lora_B); unneeded ones come back as empty tensors.
//
// Kernels: CPU in lora_cpu.cpp; CUDA in cuda/lora_cuda.cu (native, choosing Triton by the rule in
// use_triton) when built with CUDA, else registered from Python (lora_ext/kernels/cuda_dispatch.py,
// Triton only); autograd in lora_autograd.cpp; fake kernels in lora_ext/ops.py.
#include <torch/extension.h>

#include "triton_bridge.h"

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

// The Triton implementations, set from Python (see triton_bridge.h). Never destroyed:
// they would otherwise be released after the interpreter is gone at exit.
pybind11::object* triton_forward_fn = nullptr;
pybind11::object* triton_backward_fn = nullptr;

void set_triton_kernels(pybind11::object forward_fn, pybind11::object backward_fn) {
  triton_forward_fn = new pybind11::object(std::move(forward_fn));
  triton_backward_fn = new pybind11::object(std::move(backward_fn));
}

pybind11::object* triton_masked_down_fn = nullptr;
pybind11::object* triton_masked_grad_y_fn = nullptr;
pybind11::object* triton_masked_up_fn = nullptr;

void set_triton_masked_pieces(pybind11::object down_fn, pybind11::object grad_y_fn, pybind11::object up_fn) {
  triton_masked_down_fn = new pybind11::object(std::move(down_fn));
  triton_masked_grad_y_fn = new pybind11::object(std::move(grad_y_fn));
  triton_masked_up_fn = new pybind11::object(std::move(up_fn));
}

bool built_with_cuda() {
#ifdef LORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

namespace lora {

bool triton_kernels_registered() { return triton_forward_fn != nullptr; }

std::tuple<at::Tensor, at::Tensor> triton_linear_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed) {
  pybind11::gil_scoped_acquire gil;
  auto result = (*triton_forward_fn)(x, weight, bias, lora_A, lora_B, scale, dropout_p,
                                     std::string(dropout_position), seed);
  return result.cast<std::tuple<at::Tensor, at::Tensor>>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> triton_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  pybind11::gil_scoped_acquire gil;
  std::vector<bool> mask(output_mask.begin(), output_mask.end());
  auto result = (*triton_backward_fn)(grad_y, x, weight, lora_A, lora_B, xa, scale, dropout_p,
                                      std::string(dropout_position), seed, mask);
  return result.cast<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>>();
}

bool triton_masked_pieces_registered() { return triton_masked_down_fn != nullptr; }

at::Tensor triton_masked_down(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& seed, double p) {
  pybind11::gil_scoped_acquire gil;
  return (*triton_masked_down_fn)(x2, lora_A, seed, p).cast<at::Tensor>();
}

std::tuple<at::Tensor, at::Tensor> triton_masked_grad_y(const at::Tensor& g2, const at::Tensor& lora_B,
                                                        const at::Tensor& xa, double scale, const at::Tensor& seed,
                                                        double p, bool need_grad_xa, bool need_grad_B) {
  pybind11::gil_scoped_acquire gil;
  return (*triton_masked_grad_y_fn)(g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B)
      .cast<std::tuple<at::Tensor, at::Tensor>>();
}

std::tuple<at::Tensor, at::Tensor> triton_masked_up(const at::Tensor& grad_xa, const at::Tensor& lora_A,
                                                    const at::Tensor& x2, const at::Tensor& seed, double p,
                                                    bool need_x, bool need_A) {
  pybind11::gil_scoped_acquire gil;
  return (*triton_masked_up_fn)(grad_xa, lora_A, x2, seed, p, need_x, need_A)
      .cast<std::tuple<at::Tensor, at::Tensor>>();
}

}  // namespace lora

// The Python module: build facts and the registration of the Triton callbacks
// (lora_ext/kernels/cuda_dispatch.py). The ops themselves are torch.ops.lora.*.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lora_ext C++/CUDA kernels; the ops are torch.ops.lora.*";
  module.def("has_cuda", &built_with_cuda, "True when the native CUDA kernels were compiled in");
  module.def("set_triton_kernels", &set_triton_kernels,
             "Registers the Triton forward/backward the C++ CUDA kernels call for backend 'triton'");
  module.def("set_triton_masked_pieces", &set_triton_masked_pieces,
             "Registers the Triton masked thin products the native CUDA path uses for its dropout steps");
}
