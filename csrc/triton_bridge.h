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

// The forward as one Triton GEMM on Hopper (lora_ext/kernels/fused_forward.py), without dropout
// or with 'post' dropout (dropout_p > 0 and its seed; the mask in the epilogue):
// (y, xa) for x2 (M, K), or nullopt where the kernel does not take these tensors (its
// supports(): sm_90+, one 16-bit dtype, TMA-addressable layouts). Registered with
// lora_ext._C.set_triton_fused_gemms (triton_fused_gemms_registered says whether). Run like the
// masked pieces: the first call with a new key in Python, recorded; later ones replayed from C++
// (its TMA descriptors encoded there per call, triton_replay.h), or declined at once for a key
// the callback declined.
bool triton_fused_gemms_registered();
// (dx, s g B) for g2 (M, N), dropout 0: dx = g W + (s g B) A as one GEMM (fused_forward.grad_input),
// s g B in the adapters' dtype; nullopt where the kernel does not take these tensors.
// Registered and run with the forward's.
c10::optional<std::tuple<at::Tensor, at::Tensor>> triton_fused_grad_input(const at::Tensor& g2,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& lora_A,
                                                                          const at::Tensor& lora_B, double scale);
// dx = g2 W + grad_xa A for g2 (M, N) with grad_xa (M, r) given, already scaled (the input gradient
// with 'post' dropout: grad_xa = s drop(g) B from the masked step; without dropout at the sizes of
// lora_aten.cpp's fused_grad_input_given and past r = 16: grad_xa = s g B), as one GEMM
// (fused_forward.grad_input_given_xa); nullopt where the kernel does not take these tensors
// (lora_B only shapes an unused descriptor). Registered and run with the fused GEMMs.
c10::optional<at::Tensor> triton_fused_grad_input_given_xa(const at::Tensor& g2, const at::Tensor& weight,
                                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                           const at::Tensor& grad_xa);
// dA = scale_A grad_xa^T x2 (r, K) alone, the same kernel's dA programs (adapter_grads.grad_A_only):
// where dB comes from the 'post' dropout backward's masked step or is not wanted, or runs apart for the
// memory budget (lora_aten.cpp split_adapter_grads_for_memory); nullopt where
// the kernel does not take these tensors. Registered and run with the fused GEMMs.
c10::optional<at::Tensor> triton_grad_A_only(const at::Tensor& grad_xa, const at::Tensor& x2, double scale_A);
// dB = scale_B g2^T xa (N, r) alone, the same kernel's dB programs (adapter_grads.grad_B_only): where
// dA and dB run apart so that grad_xa is freed before dB is allocated; nullopt where the kernel does
// not take these tensors.
c10::optional<at::Tensor> triton_grad_B_only(const at::Tensor& xa, const at::Tensor& g2, double scale_B);
// (dA, dB) = (scale_A grad_xa^T x2 (r, K), scale_B g2^T xa (N, r)), dropout 0, in one launch
// (lora_ext/kernels/adapter_grads.py); nullopt where the kernel does not take these tensors.
// Registered and run with the fused GEMMs.
c10::optional<std::tuple<at::Tensor, at::Tensor>> triton_adapter_grads(const at::Tensor& grad_xa, const at::Tensor& x2,
                                                                       const at::Tensor& xa, const at::Tensor& g2,
                                                                       double scale_A, double scale_B);
c10::optional<std::tuple<at::Tensor, at::Tensor>> triton_fused_forward(const at::Tensor& x2, const at::Tensor& weight,
                                                                       const c10::optional<at::Tensor>& bias,
                                                                       const at::Tensor& lora_A,
                                                                       const at::Tensor& lora_B, double scale,
                                                                       double post_dropout_p,
                                                                       const c10::optional<at::Tensor>& seed);

// The native path's dropout steps on Triton (triton_lora.masked_*): thin products whose
// large operand is dropped out by a mask regenerated on load, so the native path writes
// no dropped copy of x or dY. Registered with lora_ext._C.set_triton_masked_pieces. After the
// first call with a given key their launches are replayed from C++ (triton_replay.h, lora.cpp).
bool triton_masked_pieces_registered();
// xa = drop_pre(x2) A^T.
at::Tensor triton_masked_down(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& seed, double p);
// (s drop_post(g2) B, s drop_post(g2)^T xa); empty tensors where not needed.
std::tuple<at::Tensor, at::Tensor> triton_masked_grad_y(const at::Tensor& g2, const at::Tensor& lora_B,
                                                        const at::Tensor& xa, double scale, const at::Tensor& seed,
                                                        double p, bool need_grad_xa, bool need_grad_B);
// (drop_pre(grad_xa A) in x2's dtype, grad_xa^T drop_pre(x2)); empty tensors where not needed.
std::tuple<at::Tensor, at::Tensor> triton_masked_up(const at::Tensor& grad_xa, const at::Tensor& lora_A,
                                                    const at::Tensor& x2, const at::Tensor& seed, double p,
                                                    bool need_x, bool need_A);

}  // namespace lora
