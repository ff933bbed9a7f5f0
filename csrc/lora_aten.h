// The lora ops written as whole-tensor ATen calls. The same code runs on any
// device: cuBLAS/MKL do the GEMMs, and only the in-place dropout step has a
// per-device kernel (lora_cpu.cpp, cuda/lora_cuda.cu).
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <string>
#include <tuple>

namespace lora {

// t <- t * (keep(seed, i) ? kept_scale : 0) for every linear index i of the
// contiguous tensor t (the mask of philox.h); a dropped NaN/Inf stays NaN.
void dropout_scale_cpu_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale);
#ifdef LORA_WITH_CUDA
void dropout_scale_cuda_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale);
#endif
void dropout_scale_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale);

#ifdef LORA_WITH_CUDA
// The 'post' backward's LoRA step in one pass over the (M, N) dY g2, natively (cuda/masked_grad_y.cu):
// (s drop(g2) B, s drop(g2)^T xa) in lora_B's dtype; empty tensors where not needed. Supported:
// contiguous 16-byte-aligned bf16/f16 g2 with N % 8 == 0, lora_B and xa of the same dtype,
// r <= 64, sm_80 or newer; LORA_EXT_NATIVE_GRAD_Y=0 turns it off (then the Triton pass runs).
bool masked_grad_y_cuda_supports(const at::Tensor& g2, const at::Tensor& lora_B, const at::Tensor& xa);
// max_partial_bytes: how large its float32 partials may grow (masked_grad_y_grid.h; the op passes dx's
// size, allocated after this step); 0: no larger than the first rule's.
std::tuple<at::Tensor, at::Tensor> masked_grad_y_cuda(const at::Tensor& g2, const at::Tensor& lora_B,
                                                      const at::Tensor& xa, double scale, const at::Tensor& seed,
                                                      double p, bool need_grad_xa, bool need_grad_B,
                                                      int64_t max_partial_bytes = 0);
// How masked_grad_y_cuda splits its work: "balanced" (the default) or "sqrt" (the first rule, for
// A/B measurements; LORA_EXT_MASKED_GRAD_Y_GRID=sqrt at import); returns the previous one.
std::string set_masked_grad_y_grid_rule(const std::string& rule);
// Which load scheme masked_grad_y_cuda's kernel uses: 0 (registers one tile ahead, the default)
// or 3 (a cp.async ring of three shared-memory tiles); returns the previous one.
int set_masked_grad_y_stages(int stages);

// A forward's LoRA term for few tokens in one kernel (cuda/small_m_forward.cu): xa = x2 A^T
// written into xa (M, r), and y (M, N, holding x W^T + b) += s xa B^T. Supported: 1 to
// kSmallForwardMaxRows rows, contiguous bf16/f16 x2, lora_A, lora_B of one dtype, even K and
// N, r <= 64, sm_90 or newer (thread-block clusters). The op uses it for up to 16 rows, and up to
// 128 when K + N <= 8192 (lora_aten.cpp), unless LORA_EXT_SMALL_M_FORWARD=0 (at import) or
// set_small_m_forward(false) (for A/B measurements and tests).
constexpr int64_t kSmallForwardMaxRows = 128;
bool small_m_forward_cuda_supports(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B);
void small_m_forward_cuda(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, at::Tensor& y,
                          at::Tensor& xa, double scale);
// Blocks per thread-block cluster small_m_forward_cuda launches for these inputs: 16 where K is long
// enough that 8 K-slices would leave step 1 more than one round of loads per warp and the device
// fits a 16-block cluster, else 8.
int64_t small_m_forward_cluster_blocks(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B);
#endif

// Turns the op's few-token forward path on or off (all builds; without CUDA it is never taken);
// returns the previous setting.
bool set_small_m_forward(bool enabled);
// Turns the native CUDA path's fused Triton forward (lora_aten.cpp use_fused_forward) on or off;
// returns the previous setting. On by default; LORA_EXT_FUSED_FORWARD=0 turns it off at import.
bool set_fused_forward(bool enabled);
// Turns the fused Triton forward for few tokens (lora_aten.cpp use_fused_small_m_forward: up to 16
// rows and 8192 inputs, dropout-free) on or off; returns the previous setting. On by default (measured, NOTES.md #44);
// LORA_EXT_FUSED_SMALL_M_FORWARD=0 turns it off at import.
bool set_fused_small_m_forward(bool enabled);
// The same for the fused input gradient (lora_aten.cpp use_fused_grad_input, and the grad_xa-given
// form: fused_grad_input_given).
bool set_fused_grad_input(bool enabled);
// The same for the one-launch adapter gradients (lora_aten.cpp use_fused_adapter_grads); on by
// default, LORA_EXT_FUSED_ADAPTER_GRADS=0 turns it off at import.
bool set_fused_adapter_grads(bool enabled);
// The largest rank at which dA and dB together (or dA alone) run in one launch at any width (16 by default; from
// 0, never past 2048 outputs; at most 64); returns the previous value. For the probes' A/B of
// wider rules (benchmarks/NOTES.md #40); raises for a value outside [0, 64].
int64_t set_fused_adapter_grads_any_width_max_rank(int64_t rank);
// The memory budget of the dropout-free backward's adapter gradients: where one launch's xa, grad_xa, dA
// and dB pass it and dA, then dB with grad_xa released, fit it, the two run apart (lora_aten.cpp
// split_adapter_grads_for_memory; 1 MiB by default, 0: always one launch; not a cap: where two launches
// pass it too, one runs); returns the previous value; raises for a negative value.
int64_t set_adapter_grads_memory_budget(int64_t bytes);
// The same for the fused forward and input gradient with 'post' dropout (lora_aten.cpp
// use_fused_post_dropout_*); on by default, LORA_EXT_FUSED_POST_DROPOUT=0 turns them off at import.
bool set_fused_post_dropout(bool enabled);
// Its current setting (the Triton backend reads it too: triton_lora.linear_forward).
bool fused_post_dropout_on();

std::tuple<at::Tensor, at::Tensor> linear_forward_aten(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, c10::string_view backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask,
    c10::string_view backend);

// How large the 'post' masked step's float32 partials may grow: dx's bytes when dx is wanted (dx is
// allocated after the step, so partials up to its size raise no peak; masked_grad_y_grid.h), else 0 (the
// kernel's first rule). A SymInt: the autograd computes it for lora::post_dropout_grad_y from x, whose rows
// may be symbolic under torch.compile; the same value as linear_backward's, so the halves' bits are its.
c10::SymInt post_dropout_partial_bytes_cap(const at::Tensor& x, bool need_x);
// The two halves of lora::linear_backward with 'post' dropout, as ops of their own
// (lora::post_dropout_grad_y, lora::linear_backward_from_grad_xa) so that the autograd can release xa
// between them (lora_autograd.cpp). The first: (s drop(dY) B, s drop(dY)^T xa), empty where
// output_mask says not wanted; partial_bytes_cap: post_dropout_partial_bytes_cap's value. The second:
// (dx, dW, db, dA) from grad_xa = s drop(dY) B, the first half's.
std::tuple<at::Tensor, at::Tensor> post_dropout_grad_y_aten(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                            const at::Tensor& xa, double scale, double dropout_p,
                                                            const at::Tensor& seed, std::array<bool, 2> output_mask,
                                                            int64_t partial_bytes_cap);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_from_grad_xa_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& grad_xa, std::array<bool, 4> output_mask);

#ifdef LORA_WITH_CUDA
// Whether a CUDA call of the lora ops with this backend argument runs the Triton backend (cuda/lora_cuda.cu).
bool use_triton(c10::string_view backend);
#endif

}  // namespace lora
