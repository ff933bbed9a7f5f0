#include "lora_aten.h"

#include <ATen/OpMathType.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "checks.h"
#include "triton_bridge.h"

namespace lora {

void dropout_scale_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  if (t.is_cpu()) return dropout_scale_cpu_(t, seed, p, kept_scale);
#ifdef LORA_WITH_CUDA
  if (t.is_cuda()) return dropout_scale_cuda_(t, seed, p, kept_scale);
#endif
  TORCH_CHECK(false, "lora: no dropout kernel for device ", fmt(t.device()),
              " (was lora_ext built with CUDA? see lora_ext._C.has_cuda())");
}

namespace {

// A fresh contiguous copy of `t` in `dtype` that the caller may overwrite.
at::Tensor owned_copy(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
}

// `t` flattened to (rows, cols), without copying when its strides allow. Both sizes are
// given: reshape({-1, 0}) of an empty tensor is ambiguous (in_features or out_features 0).
at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  // Already 2-D: no reshape call (host time: decode is host-bound, NOTES.md #24).
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

// grad_y as the (rows, cols) matrix the backward kernels read: contiguous on CUDA whatever autograd hands
// in (the expanded gradient of a sum in eager, a contiguous tangent under AOTAutograd), since the native
// and Triton kernels take only contiguous rows, so which one runs, and so the bits of every gradient,
// depend on the sizes and on which gradients are wanted (the 'post' masked step caps its partials at dx's
// size when dx is wanted: masked_grad_y_grid.h), not on g's strides. A copy only where it is not
// contiguous already (at::mm copies an expanded g too).
at::Tensor grad_matrix(const at::Tensor& grad_y, int64_t rows, int64_t cols) {
  const at::Tensor g = as_matrix(grad_y, rows, cols);
  return g.is_cuda() ? g.contiguous() : g;
}

// y (M, N) in x's leading shape (..., N); no view call when x is 2-D.
at::Tensor with_leading_shape(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(y.size(1));
  return y.view(shape);
}

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Switches read once from the environment: on unless the variable is "0" / off unless it is "1".
bool on_unless_env_zero(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::string(env) != "0";
}

bool on_if_env_one(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && std::string(env) == "1";
}

// Dropout steps on CUDA go to the Triton masked thin products (triton_bridge.h) when they
// are registered and take these inputs (their tl.dot has no float64; rank <= 256, the
// Triton MAX_KERNEL_RANK): the mask is then applied on load and no dropped M x K copy of
// x ('pre') or M x N copy of dY ('post') is written. Measured on the H200 at M=8192, r=16
// (compose_ab.py, 2026-11-28): the copy + Philox pass + cuBLAS route costs more than the
// Triton pass at every shape but k/v 'post' backward (84 vs ~68 us), and the copies were
// the +17...225 MiB of extra peak memory the native path had with dropout.
// LORA_EXT_DROPOUT_COPY=1 turns this off (the copy route, an activation-sized temporary per
// layer call). It was faster end to end while the pieces were launched from Python (~100-150 us
// of host time per call; NOTES.md #6); they are now replayed from C++ (NOTES.md #10).
bool use_masked_pieces(const at::Tensor& x, const at::Tensor& lora_A) {
  static const bool copy_route = on_if_env_one("LORA_EXT_DROPOUT_COPY");
  return !copy_route && x.is_cuda() && triton_masked_pieces_registered() && x.scalar_type() != at::kDouble &&
         lora_A.scalar_type() != at::kDouble && lora_A.size(0) <= 256;
}

// Whether the 'post' backward's masked step runs the native one-pass kernel (cuda/masked_grad_y.cu).
// Measured on the H200 against the Triton pass it replaces (benchmarks/NOTES.md #21), faster at
// every shape but one until its thin operands were read as vectors (#79): at r > 32 over a wide dY
// (N >= 8192) Triton's two passes took 425.1 us against its 478.5 at M = 8192, r = 64 (H200, 12-04,
// #32). After #79 the native step took 370.1 against 423.5 there (H100, 12-06 19:58), 342.2 against 425.1
// on the H200 (12-06 21:51), and the op's fwd+bwd at p = 0.1 lost ~80 us of device time with it (#80).
bool use_native_masked_grad_y(const at::Tensor& g, const at::Tensor& lora_B, const at::Tensor& xa) {
#ifdef LORA_WITH_CUDA
  return masked_grad_y_cuda_supports(g, lora_B, xa);
#else
  (void)g, (void)lora_B, (void)xa;
  return false;
#endif
}

// Whether a dropout-free forward takes the few-token path: the base GEMM on cuBLAS, then the
// whole LoRA term in one kernel (cuda/small_m_forward.cu) instead of two more cuBLAS calls.
// For decode, whose time is the host's launch path (benchmarks/NOTES.md #24). Up to 16 rows it
// is used at every shape; from 17 to 128 rows only for narrow layers (K + N <= 8192): measured
// on the H200 at M = 128, the kernel took 5-7 us more device time than the two cuBLAS calls at
// 4096 x 14336 and 14336 x 4096, where the base GEMM makes the call device-bound, and saved
// ~20 us of host time at 4096 x 4096 and 4096 x 1024, where the call is host-bound.
constexpr int64_t kSmallForwardAnyShapeRows = 16;
constexpr int64_t kSmallForwardNarrowWidth = 8192;
std::atomic<bool> small_m_forward_enabled{on_unless_env_zero("LORA_EXT_SMALL_M_FORWARD")};

// Called only in CUDA builds (the CPU-only build compiles it too, without a caller).
[[maybe_unused]] bool use_small_m_forward(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B) {
#ifdef LORA_WITH_CUDA
  const int64_t M = x2.size(0), width = x2.size(1) + lora_B.size(0);
  return small_m_forward_enabled && x2.is_cuda() &&
         (M <= kSmallForwardAnyShapeRows || width <= kSmallForwardNarrowWidth) &&
         small_m_forward_cuda_supports(x2, lora_A, lora_B);
#else
  (void)x2, (void)lora_A, (void)lora_B;
  return false;
#endif
}

// Whether a dropout-free forward of few tokens runs as one launch of the fused Triton GEMM
// (fused_forward.linear_forward with small_m_config's tiles) instead of the few-token path's
// cuBLAS x W^T + b and LoRA-term kernel: one host path (the replayed launch) instead of cuBLAS's
// plus a kernel launch, and W, x and A read by one kernel. Measured on the H200 (benchmarks/RESULTS.md,
// "Decode routes", 12-05 12:00): host time per module call 14.7 us against the few-token path's 23.5
// (nn.Linear: 14.9); device time at M = 16, r = 16 better at gate/up (37.6 against 38.5 us), worse at
// q/o (16.3 against 15.0) and k/v (14.3 against 12.1); back-to-back decode, host-bound at q/o and k/v,
// faster at every shape with K = 4096 up to 16 rows (on an H100 too, NOTES.md #44).
// On by default: LORA_EXT_FUSED_SMALL_M_FORWARD=0 or set_fused_small_m_forward(false) turns it off.
// bf16/fp16 with x, W and the adapters in one dtype, nothing empty (checked here, so that other calls
// never reach Python: a declined key is only remembered for 16-bit non-empty tensors); where the
// callback declines (layouts TMA cannot address, before Hopper) the call takes the path it takes with
// the switch off.
// Not past 8192 inputs: every program recomputes x A^T from L2 over the whole K, (rows + padded rank) x K
// per program against its K x BLOCK_N of W, so at 14336 x 4096 (down: ~128 programs) that is as many L2
// bytes as W's 117 MB, and the launch lost its saved host time there on the H200 (12-05 12:00, M = 16,
// device 50.8 against the few-token kernel route's 42.0 us at r = 16, 56.5 against 50.1 at r = 64;
// back-to-back / base 1.57 against 1.32).
constexpr int64_t kFusedSmallMForwardMaxRows = 16;
constexpr int64_t kFusedSmallMForwardMaxK = 8192;
std::atomic<bool> fused_small_m_forward_enabled{on_unless_env_zero("LORA_EXT_FUSED_SMALL_M_FORWARD")};

// Whether a dropout-free forward at training sizes runs as one Triton GEMM
// (lora_ext/kernels/fused_forward.py): x W^T and x A^T from the same x tiles, and s xa B^T as
// one more K step of the same accumulator, so neither the separate pass over x for xa nor the
// read-modify-write of y is paid. Measured on the H200 at M = 8192, r = 16 (benchmarks/NOTES.md
// #26, same-run ratios to cuBLAS's x W^T): 1.19 against the composed path's 1.35 at
// 4096 x 1024 (k, v). At the wide layers Triton's GEMM itself is 0-15% slower than cuBLAS's,
// which eats the gain (4096 x 14336: 1.06 vs 1.09; 14336 x 4096: 1.07 vs 1.03; 4096 x 4096:
// 1.24 vs 1.25), so those stay composed. Measured at M = 8192, r = 16 and 64 (1.30 vs 1.42 at
// 4096 x 1024, NOTES.md #27): used from 4096 rows, for N <= 2048 and r <= 64. And at any width
// with at most 2048 inputs and r <= 16, where the first tile's x A^T is short: at M = 4096, r = 16
// (the end-to-end model's layers, H200 12-05 13:38, NOTES.md #52) the kernel took 1.135x cuBLAS's
// x W^T at 2048 x 5632 against the composed op's 1.25-1.26, and 1.055 against 1.14-1.15 at
// 2048 x 32000 (Triton's GEMM alone 1.02 and 0.96). Only r = 16 was measured there.
// On by default (LORA_EXT_FUSED_FORWARD=0 or set_fused_forward(false): off). The launch is a
// replayed piece (triton_bridge.h): from the second call with a key it is launched from C++,
// its TMA descriptors encoded there, 14 us of host time against the composed path's 62 (a
// launch from Python cost ~100 us and made the host-bound k/v fwd+bwd slower: NOTES.md #26, #27).
constexpr int64_t kFusedForwardMinRows = 4096;
constexpr int64_t kFusedForwardMaxWidth = 2048;
constexpr int64_t kFusedForwardAnyWidthMaxInputs = 2048;
constexpr int64_t kFusedForwardAnyWidthMaxRank = 16;
constexpr int64_t kFusedForwardMaxRank = 64;
std::atomic<bool> fused_forward_enabled{on_unless_env_zero("LORA_EXT_FUSED_FORWARD")};

// What both fused forwards (with and without 'post' dropout) need besides their width rule.
bool fused_forward_takes(const at::Tensor& x2, const at::Tensor& lora_A) {
  return fused_forward_enabled && x2.is_cuda() && triton_fused_gemms_registered() &&
         x2.size(0) >= kFusedForwardMinRows && lora_A.size(0) <= kFusedForwardMaxRank;
}

bool use_fused_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A) {
  return fused_forward_takes(x2, lora_A) &&
         (weight.size(0) <= kFusedForwardMaxWidth ||
          (x2.size(1) <= kFusedForwardAnyWidthMaxInputs && lora_A.size(0) <= kFusedForwardAnyWidthMaxRank));
}

bool use_fused_small_m_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A) {
  const auto dtype = x2.scalar_type();
  return fused_small_m_forward_enabled && x2.is_cuda() && triton_fused_gemms_registered() &&
         (dtype == at::kHalf || dtype == at::kBFloat16) && weight.scalar_type() == dtype &&
         lora_A.scalar_type() == dtype && x2.size(0) > 0 && x2.size(0) <= kFusedSmallMForwardMaxRows &&
         x2.size(1) <= kFusedSmallMForwardMaxK && lora_A.size(0) > 0 && lora_A.size(0) <= kFusedForwardMaxRank;
}

// The dropout-free input gradient the same way (fused_forward.grad_input): dx = g W + (s g B) A
// as one GEMM whose reduction runs over the layer's N outputs, g B from the same g tiles. Saves
// the composed path's separate g B product and the (M, K) write and re-read of the LoRA part of
// dx. Measured on the H200 (M = 8192, r = 16, ratio to cuBLAS's g W, two runs; NOTES.md #28):
// 4096 x 1024 1.23-1.25 against 1.56-1.57 composed. At the wide layers Triton's GEMM swings
// between runs and does not win reliably (4096 x 4096 1.09-1.21 vs 1.12-1.13, 14336 x 4096
// 1.03-1.12 vs 1.05-1.06, 4096 x 14336 1.13 vs 1.06): the forward's sizes, r <= 16. And up to
// 8192 outputs where dx is at most 2048 wide (the end-to-end model's gate/up, 4096 tokens: 1.19
// against 1.25 composed on the H200, 12-05 13:38; 1.21 against 1.32 on the H100, 14:43; NOTES.md
// #53). At 2048 x 32000 the first tile's g B over 32000 outputs loses (1.16 against 1.10; 1.30
// against 1.12).
std::atomic<bool> fused_grad_input_enabled{on_unless_env_zero("LORA_EXT_FUSED_GRAD_INPUT")};

constexpr int64_t kFusedGradInputMaxRank = 16;  // measured at r = 16 only
constexpr int64_t kFusedGradInputNarrowMaxInputs = 2048;
constexpr int64_t kFusedGradInputNarrowMaxOutputs = 8192;
// The grad_xa-given form up to r = 64 at k/v widths (N <= 2048): the composed dx there is cuBLAS's
// grad_xa A (an (M, K) write, 24 us at k/v r = 64) and g W with beta = 1 (117.6 us; cuBLAS's g W alone took
// 97.9 in #67's run): ~142 us on an H100 (12-06 16:30, NOTES.md #76), against the given form's Triton GEMM
// (112.9 at k/v, #67, with 4 stages; 3 at r = 64) plus one K step of 64 for the rank beside g W's 16 (+6%).
// Predicted -12 to -27 us at k/v r = 64. Measured (H100, 12-06 17:20, before and after alternated twice in
// one call, NOTES.md #77): the op's fwd+bwd device time at k/v r = 64 312.8 -> 285.8 us (p = 0) and
// 372.2 -> 346.4 (p = 0.1), 0.91 and 0.93; r = 16 (the rule unchanged) 1.000 and 0.998. The rule takes any
// number of inputs at N <= 2048, as the r <= 16 rules do; past r = 16 only 4096 inputs were measured (the
// end-to-end model's down, 5632 -> 2048, now takes it at r > 16 unmeasured; that model runs r = 16).
constexpr int64_t kFusedGradInputGivenMaxRank = 64;

// What both fused input gradients (with and without 'post' dropout) need besides their width rule.
bool fused_grad_input_takes(const at::Tensor& g2, const at::Tensor& lora_A,
                            int64_t max_rank = kFusedGradInputMaxRank) {
  return fused_grad_input_enabled && g2.is_cuda() && triton_fused_gemms_registered() &&
         g2.size(0) >= kFusedForwardMinRows && lora_A.size(0) <= max_rank &&
         lora_A.scalar_type() == g2.scalar_type();
}

// Past r = 16, the grad_xa-given input gradient at k/v widths (NOTES.md #76): with 'post' dropout
// grad_xa comes from the masked step; without dropout from cuBLAS's s g B, which the backward forms
// for dA anyway.
bool fused_grad_input_given_past_rank_16(const at::Tensor& g2, const at::Tensor& weight, const at::Tensor& lora_A) {
  return lora_A.size(0) > kFusedGradInputMaxRank && weight.size(0) <= kFusedForwardMaxWidth &&
         fused_grad_input_takes(g2, lora_A, kFusedGradInputGivenMaxRank);
}

bool use_fused_grad_input(const at::Tensor& g2, const at::Tensor& weight, const at::Tensor& lora_A) {
  const int64_t outputs = weight.size(0), inputs = weight.size(1);
  return fused_grad_input_takes(g2, lora_A) &&
         (outputs <= kFusedForwardMaxWidth ||
          (inputs <= kFusedGradInputNarrowMaxInputs && outputs <= kFusedGradInputNarrowMaxOutputs));
}

// With 'post' dropout (one switch for both; sizes below and in use_fused_grad_input): the forward's
// mask is generated in the fused GEMM's epilogue, on the LoRA term's own product per 64-column
// chunk (one Philox evaluation per group of eight, as csrc/philox.h), so neither the composed
// path's pass over x for xa nor its
// separate mask pass over the (M, N) LoRA term and the beta = 1 read of it are paid. Counted
// (benchmarks/NOTES.md #33; the SASS after two fixes there): at 4096 x 1024 ~1.25x the base
// against the composed 1.48x. And the input gradient dx = g W + grad_xa A as one GEMM with
// grad_xa = s drop(g) B given (from the masked step): no (M, K) write of grad_xa A and no beta = 1
// read of it by cuBLAS's g W (the dropout-free fused input gradient measured 1.23-1.25x cuBLAS's
// g W against 1.56x composed, #28; NOTES.md #34). Measured on the H200 (M = 8192, bf16, ratio
// to the frozen base in the same run, two rounds against four of the composed path; NOTES.md #39):
// forward at p = 0.1, k/v 1.29-1.31 against 1.50-1.53 (r = 16), q/o 1.14-1.18 against 1.20-1.34,
// gate/up 1.16 against 1.17-1.30; fwd+bwd at k/v 1.48-1.50 against 1.83-2.86 (with the one-launch
// dA below). On by default: LORA_EXT_FUSED_POST_DROPOUT=0 or set_fused_post_dropout(false) turns
// both off (LORA_EXT_FUSED_FORWARD=0 / LORA_EXT_FUSED_GRAD_INPUT=0 turn the fused GEMMs off too).
std::atomic<bool> fused_post_dropout_enabled{on_unless_env_zero("LORA_EXT_FUSED_POST_DROPOUT")};

// The forward's sizes differ from the dropout-free rule: the composed 'post' forward pays a mask
// pass over the (M, N) LoRA term on top (qo +37 us, gate_up +122 us, 12-04 18:31: op p = 0.1 at
// 1.38 / 1.17 against the fused kernel's p = 0 1.24 / 1.06), so the fused form is predicted to win
// at every width up to K = 4096 inputs; at 14336 x 4096 (down) the first tile's longer x A^T
// and the small mask pass (2.7%) leave it even, so wider inputs stay composed; except up to 8192
// inputs at k/v widths (N <= 2048), where the mask pass is a larger share than x A^T: the end-to-end
// model's down, 5632 x 2048 at 4096 tokens, took 1.24x the base fused against the op's composed
// 1.37 (H100, 12-05 14:43; NOTES.md #53). The Triton backend's rule is the same
// (triton_lora.fused_post_forward_takes_width).
constexpr int64_t kFusedPostForwardMaxInputs = 4096;
constexpr int64_t kFusedPostForwardNarrowMaxInputs = 8192;

bool use_fused_post_dropout_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& lora_A) {
  const int64_t inputs = x2.size(1);
  return fused_post_dropout_enabled && fused_forward_takes(x2, lora_A) &&
         (inputs <= kFusedPostForwardMaxInputs ||
          (inputs <= kFusedPostForwardNarrowMaxInputs && weight.size(0) <= kFusedForwardMaxWidth));
}

// The input gradient with grad_xa given has no first tile's g B to pay, so it also runs at any width
// where dx is at most 2048 wide: 1.03x cuBLAS's g W against 1.14 composed at 2048 x 5632, 0.995
// against 1.06 at 2048 x 32000 (H100, 12-05 14:43, 4096 tokens; NOTES.md #53). Elsewhere it is a trade:
// the composed dx's cuBLAS grad_xa A writes an (M, K) tensor that g W with beta = 1 reads back (bytes in
// M K), against Triton's GEMM running behind cuBLAS's g W (time in M N K): both grow with K, so the sign
// follows the contraction's depth N, the saved bytes weighing more the shallower it is. Timed as pieces,
// dx alone, composed against given, three passes (H100, 12-07 10:32-10:53, M = 8192, r = 16; NOTES.md #92,
// #93): 14336 x 4096 (down) -27…-79 us, 4096 x 4096 (q/o) -8…-19 us, 4096 x 14336 (gate/up) +12…+53 us.
// So the given form where the contraction is at most 4096 deep (N <= 4096), composed where it is deeper
// and dx is more than 2048 wide (gate/up's kind, and wider ones: 5120 x 13824 or 8192 x 28672 were not
// timed, and the model predicts the same loss there). Only those three shapes at M = 8192 were timed.
constexpr int64_t kGivenGradInputMaxDepth = 4096;
// The grad_xa-given dx's sizes, whichever backward forms grad_xa: the 'post' dropout one's masked step,
// or the dropout-free one's s g B (which dA needs anyway; there where use_fused_grad_input, whose kernel
// forms g B itself, does not take the layer). The trade is the same with either grad_xa (NOTES.md #91,
// #95): up to r = 16 at the sizes above, past it at k/v widths.
bool fused_grad_input_given(const at::Tensor& g2, const at::Tensor& weight, const at::Tensor& lora_A) {
  return (fused_grad_input_takes(g2, lora_A) &&
          (weight.size(0) <= kGivenGradInputMaxDepth || weight.size(1) <= kFusedGradInputNarrowMaxInputs)) ||
         fused_grad_input_given_past_rank_16(g2, weight, lora_A);
}
bool use_fused_post_dropout_grad_input(const at::Tensor& g2, const at::Tensor& weight, const at::Tensor& lora_A) {
  return fused_post_dropout_enabled && fused_grad_input_given(g2, weight, lora_A);
}

// Both adapter gradients of the dropout-free backward in one Triton launch
// (lora_ext/kernels/adapter_grads.py): each program owns a block of dA's or dB's columns and
// walks all M tokens, so x and g are read once, with no split-K partials or reduce kernels.
// cuBLAS runs each as a split-K GEMM plus a reduce (four launches). Where dB is not computed with
// dA ('post' dropout: the masked step gives it; or not wanted), dA alone runs as the same
// kernel's dA programs (adapter_grads.grad_A_only). Measured on the H200 in the whole op (M = 8192,
// bf16, fwd+bwd over the frozen base's, same run; NOTES.md #39): at 4096 x 1024 (k/v), p = 0,
// 1.34-1.39 against 1.32-2.64 (r = 16) and 1.47-1.49 against 1.97-2.60 (r = 64); at 4096 outputs
// and more, with its first tiles (128 x 32 x 4), it was even or lost (q/o r = 16 1.14-1.15 against
// 1.09-1.19, down r = 64 'post' 1.17 against 1.13). With the tiles of NOTES.md #40 (chosen per
// launch by adapter_grads.tile_config) both gradients together beat cuBLAS's pair at every shape at
// r = 16 (device time: q/o 41.9 against 52.2 us, gate/up and down 80.0 against 87.3-87.5), so together
// they run at any width up to r = 16 (as two launches where the memory budget asks for it, below), and
// so does dA alone ('post' dropout, dB not wanted: its time is the pass over x, set by M, K and r, not
// by the outputs; NOTES.md #94, H100, device time against cuBLAS's split-K: q/o 32.2 against 34.1 us,
// gate/up 32.3 against 34.2, down even, 85.5 against 85.3); r > 16 keeps the limit of 2048 outputs (the
// fused GEMMs' width) until measured there (set_fused_adapter_grads_any_width_max_rank moves the rank
// limit, for the probes' A/B). On by default: LORA_EXT_FUSED_ADAPTER_GRADS=0 or
// set_fused_adapter_grads(false) turns it off. 16-bit tensors of one dtype (no conversion copy of x
// or g), from 4096 rows.
std::atomic<bool> fused_adapter_grads_enabled{on_unless_env_zero("LORA_EXT_FUSED_ADAPTER_GRADS")};
constexpr int64_t kFusedAdapterGradsMaxRank = 64;
constexpr int64_t kFusedAdapterGradsMaxOutputs = 2048;
std::atomic<int64_t> fused_adapter_grads_any_width_max_rank{16};

// dA and dB together, or dA alone: the same rule (its time is the pass over x, or over x and g).
bool use_fused_adapter_grads(const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& lora_A) {
  const auto dtype = lora_A.scalar_type();
  const int64_t r = lora_A.size(0);
  const bool width_ok =
      g2.size(1) <= kFusedAdapterGradsMaxOutputs || r <= fused_adapter_grads_any_width_max_rank.load();
  return fused_adapter_grads_enabled && g2.is_cuda() && triton_fused_gemms_registered() &&
         g2.size(0) >= kFusedForwardMinRows && width_ok &&
         r <= kFusedAdapterGradsMaxRank && (dtype == at::kHalf || dtype == at::kBFloat16) &&
         g2.scalar_type() == dtype && x2.scalar_type() == dtype;
}

// The backward's extra memory over the frozen layer's (NOTES.md #58): at its peak, xa (saved, M x r),
// grad_xa (M x r), dA (r x K) and dB (N x r) are alive together when one launch computes dA and dB.
// Apart, dA first and then dB once grad_xa is released, the peak is xa + dA + max(grad_xa, dB): at
// M = 8192, r = 16, bf16, gate/up 1.06 -> 0.81 MiB and down 1.06 -> 0.94 MiB, for a second launch
// (each reads its own operand, x or g, as the one launch did: ~7-10 us counted on the H200, ~0.3% of
// those layers' fwd+bwd). At q/o (0.75 MiB) and k/v (0.66) the one launch stays: it is faster there
// (q/o: 41.9 us against ~55 for two) and within the budget. So the two launches run where the one
// launch's four tensors pass the budget and the two launches' fit it: the 1 MiB by default
// (set_adapter_grads_memory_budget; 0 keeps the one launch everywhere). Not a cap: where even two
// launches pass it (r = 64; gate/up at M = 16384: 1.56 against 1.125 MiB) the faster one launch runs.
std::atomic<int64_t> adapter_grads_memory_budget{int64_t{1} << 20};

bool split_adapter_grads_for_memory(const at::Tensor& g2, const at::Tensor& lora_A) {
  const int64_t tokens_x_rank = g2.size(0) * lora_A.size(0), grad_A_numel = lora_A.numel();
  const int64_t grad_B_numel = g2.size(1) * lora_A.size(0);
  const int64_t element = lora_A.element_size();
  const int64_t together = (2 * tokens_x_rank + grad_A_numel + grad_B_numel) * element;
  const int64_t apart = (tokens_x_rank + grad_A_numel + std::max(tokens_x_rank, grad_B_numel)) * element;
  const int64_t budget = adapter_grads_memory_budget.load();
  return together > budget && apart <= budget;
}

// alpha * a b with alpha applied in the GEMM's epilogue (beta=0: out's contents are
// ignored), instead of a separate elementwise pass and launch. alpha == 0 multiplies
// afterwards: addmm skips the product then, and a NaN/Inf input must still give NaN.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) return at::mm(a, b);
  if (alpha == 0.0) return at::mm(a, b).mul_(alpha);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/alpha);
}

// a^T b for tall a (M x P) and b (M x r): the adapter gradients dB = g^T xa and
// dA = dxa^T x, whose outputs are thin (P x r) and whose reduction runs over all M
// tokens. One GEMM: measured on the H200 (benchmarks/compose_ab.py, cuBLAS of torch
// 2.11, M=8192, r=16, four Llama shapes) cuBLAS's own split of this reduction is
// faster than splitting the tokens ourselves into a batched GEMM with float32 partials
// (dB 14-68 us vs 27-90 us, dA 30-68 us vs 33-82 us).
at::Tensor reduce_over_tokens(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  return scaled_mm(a.t(), b, alpha);
}

// The 'post' backward's masked step: (s drop(g) B, s drop(g)^T xa) in the adapters' dtype, each an
// empty tensor where not wanted. In one pass over g where a kernel takes it (the native one-pass kernel,
// else the Triton piece), else through a masked copy of g (a temporary of this call). g: the (M, N)
// gradient of y, contiguous on CUDA; partial_bytes_cap: see masked_grad_y_cuda's max_partial_bytes.
std::tuple<at::Tensor, at::Tensor> post_dropout_step(const at::Tensor& g, const at::Tensor& lora_B,
                                                     const at::Tensor& xa, double scale, const at::Tensor& seed,
                                                     double dropout_p, bool need_grad_xa, bool need_B,
                                                     int64_t partial_bytes_cap) {
  if (use_native_masked_grad_y(g, lora_B, xa)) {  // false in a build without CUDA
#ifdef LORA_WITH_CUDA
    return masked_grad_y_cuda(g, lora_B, xa, scale, seed, dropout_p, need_grad_xa, need_B, partial_bytes_cap);
#endif
  }
  // use_masked_pieces takes (x, lora_A): g has x's dtype and device, B^T is (r, N) as A is (r, K).
  if (use_masked_pieces(g, lora_B.t())) {
    return triton_masked_grad_y(g, lora_B, xa, scale, seed, dropout_p, need_grad_xa, need_B);
  }
  at::Tensor g_lora = owned_copy(g, lora_B.scalar_type());
  dropout_scale_(g_lora, seed, dropout_p, 1.0 / (1.0 - dropout_p));
  at::Tensor grad_B = need_B ? reduce_over_tokens(g_lora, xa, scale) : empty_grad(lora_B);  // (N, r)
  at::Tensor grad_xa = need_grad_xa ? scaled_mm(g_lora, lora_B, scale) : empty_grad(xa);     // (M, r)
  return {grad_xa, grad_B};
}

// dx = g W + grad_x_lora in x's dtype, where grad_x_lora (M, K) is in the adapters' dtype (when it differs from
// x's, or carries a mask: the beta = 1 epilogue cannot take it).
at::Tensor add_base_grad_x(const at::Tensor& g, const c10::optional<at::Tensor>& weight,
                           const at::Tensor& grad_x_lora, at::ScalarType x_dtype) {
  if (!weight.has_value()) return grad_x_lora.to(x_dtype);
  at::Tensor grad_x = at::mm(g, *weight);
  grad_x.add_(grad_x_lora);
  return grad_x;
}

// dx = g W + grad_xa A, (M, K), with grad_xa given (no mask left to apply): one fused Triton GEMM where
// `fused` (the caller's size rule, which implies a weight) holds and the kernel takes the tensors; else
// composed: where the adapters share x's dtype the small GEMM writes dx and the large one accumulates onto
// it in its epilogue (beta = 1), else add_base_grad_x.
at::Tensor grad_x_given_xa(const at::Tensor& g, const c10::optional<at::Tensor>& weight, const at::Tensor& grad_xa,
                           const at::Tensor& lora_A, const at::Tensor& lora_B, at::ScalarType x_dtype, bool fused) {
  if (fused) {
    if (auto given = triton_fused_grad_input_given_xa(g, *weight, lora_A, lora_B, grad_xa)) return *given;
  }
  if (lora_A.scalar_type() != x_dtype) return add_base_grad_x(g, weight, at::mm(grad_xa, lora_A), x_dtype);
  at::Tensor grad_x = at::mm(grad_xa, lora_A);
  if (weight.has_value()) grad_x.addmm_(g, *weight);
  return grad_x;
}

// The rest of the 'post' backward once the masked step gave grad_xa = s drop(g) B (no mask is left to
// apply): dA = grad_xa^T x, dx = g W + grad_xa A (one fused GEMM where it takes the sizes), dW = g^T x
// and db; empty tensors where not wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> post_dropout_rest(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& x2, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& grad_xa, bool need_x, bool need_weight,
    bool need_bias, bool need_A) {
  const auto lora_dtype = lora_A.scalar_type();
  at::Tensor grad_x = empty_grad(x), grad_weight = empty_grad(x), grad_bias = empty_grad(x);
  at::Tensor grad_A = empty_grad(lora_A);
  if (need_A) {
    // dA alone in one launch (the masked step gave dB): the same switch and sizes as dA and dB together.
    c10::optional<at::Tensor> alone;
    if (use_fused_adapter_grads(g, x2, lora_A)) alone = triton_grad_A_only(grad_xa, x2, 1.0);
    grad_A = alone.has_value() ? *alone : reduce_over_tokens(grad_xa, x2.to(lora_dtype));  // (r, K)
  }
  if (need_x) {
    const bool fused = weight.has_value() && use_fused_post_dropout_grad_input(g, *weight, lora_A);
    grad_x = grad_x_given_xa(g, weight, grad_xa, lora_A, lora_B, x.scalar_type(), fused).view(x.sizes());
  }
  if (need_weight) grad_weight = at::mm(g.t(), x2);  // (N, K)
  if (need_bias) grad_bias = g.sum(0);
  return {grad_x, grad_weight, grad_bias, grad_A};
}

}  // namespace

c10::SymInt post_dropout_partial_bytes_cap(const at::Tensor& x, bool need_x) {
  return need_x ? x.sym_numel() * static_cast<int64_t>(x.element_size()) : c10::SymInt(0);
}

bool set_small_m_forward(bool enabled) { return small_m_forward_enabled.exchange(enabled); }

bool set_fused_forward(bool enabled) { return fused_forward_enabled.exchange(enabled); }

bool set_fused_small_m_forward(bool enabled) { return fused_small_m_forward_enabled.exchange(enabled); }

bool set_fused_grad_input(bool enabled) { return fused_grad_input_enabled.exchange(enabled); }

bool set_fused_adapter_grads(bool enabled) { return fused_adapter_grads_enabled.exchange(enabled); }

int64_t set_fused_adapter_grads_any_width_max_rank(int64_t rank) {
  TORCH_CHECK(rank >= 0 && rank <= kFusedAdapterGradsMaxRank,
              "set_fused_adapter_grads_any_width_max_rank: rank must be in [0, ", kFusedAdapterGradsMaxRank,
              "], got ", rank);
  return fused_adapter_grads_any_width_max_rank.exchange(rank);
}

int64_t set_adapter_grads_memory_budget(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_adapter_grads_memory_budget: bytes must be >= 0, got ", bytes);
  return adapter_grads_memory_budget.exchange(bytes);
}

bool set_fused_post_dropout(bool enabled) { return fused_post_dropout_enabled.exchange(enabled); }

bool fused_post_dropout_on() { return fused_post_dropout_enabled; }

std::tuple<at::Tensor, at::Tensor> linear_forward_aten(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, c10::string_view backend) {
  check_backend(backend);
  const LinearSizes s = check_linear_args(x, weight, bias, lora_A, lora_B, dropout_p, dropout_position, seed);
  check_scale(scale, x.scalar_type(), lora_A.scalar_type());
  const auto lora_dtype = lora_A.scalar_type();
  const bool dropout = dropout_p > 0.0;
  const double keep_scale = 1.0 / (1.0 - dropout_p);
  const bool pre_dropout = dropout && s.position == DropoutPosition::kPre;
  const bool post_dropout = dropout && s.position == DropoutPosition::kPost;

  const at::Tensor x2 = as_matrix(x, s.M, s.K);

  if (!dropout && weight.has_value() && use_fused_small_m_forward(x2, *weight, lora_A)) {
    if (auto fused = triton_fused_forward(x2, *weight, bias, lora_A, lora_B, scale, 0.0, c10::nullopt)) {
      return {with_leading_shape(std::get<0>(*fused), x), std::get<1>(*fused)};
    }
  }
#ifdef LORA_WITH_CUDA
  if (!dropout && weight.has_value() && use_small_m_forward(x2, lora_A, lora_B)) {
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
    at::Tensor xa = at::empty({s.M, s.r}, lora_A.options());
    small_m_forward_cuda(x2, lora_A, lora_B, y, xa, scale);
    return {with_leading_shape(y, x), xa};
  }
#endif
  if (weight.has_value() && (dropout ? post_dropout && use_fused_post_dropout_forward(x2, *weight, lora_A)
                                     : use_fused_forward(x2, *weight, lora_A))) {
    if (auto fused = triton_fused_forward(x2, *weight, bias, lora_A, lora_B, scale, post_dropout ? dropout_p : 0.0,
                                          post_dropout ? seed : c10::optional<at::Tensor>())) {
      return {with_leading_shape(std::get<0>(*fused), x), std::get<1>(*fused)};
    }
  }

  at::Tensor xa;  // (M, r)
  if (pre_dropout && use_masked_pieces(x, lora_A)) {
    xa = triton_masked_down(x2, lora_A, *seed, dropout_p);
  } else {
    // LoRA path input: x in the adapters' dtype, dropped out here for 'pre'.
    // The copy is a temporary of this call, never saved.
    at::Tensor x_lora = x2.to(lora_dtype);
    if (pre_dropout) {
      x_lora = owned_copy(x2, lora_dtype);
      dropout_scale_(x_lora, *seed, dropout_p, keep_scale);
    }
    xa = at::mm(x_lora, lora_A.t());
  }

  at::Tensor y;
  // scale == 0 also takes the separate path: addmm with alpha=0 skips the product, so a
  // NaN/Inf in the adapters would not reach y, while 0 * NaN is NaN (reference, Triton).
  const bool lora_term_separate = lora_dtype != x.scalar_type() || scale == 0.0;
  if (post_dropout && !lora_term_separate && weight.has_value()) {
    // y starts as the dropped LoRA term (written once, masked in place), then the base
    // GEMM accumulates onto it (beta=1): no (M, N) temporary besides y itself.
    y = at::mm(xa, lora_B.t());
    dropout_scale_(y, *seed, dropout_p, scale * keep_scale);
    if (bias.has_value()) y.add_(*bias);
    y.addmm_(x2, weight->t());
  } else if (post_dropout || lora_term_separate) {
    // (M, N) LoRA term in the adapters' dtype: dropout and/or a dtype cast act on
    // it before it joins the base output.
    at::Tensor lora_out = at::mm(xa, lora_B.t());
    if (post_dropout) {
      dropout_scale_(lora_out, *seed, dropout_p, scale * keep_scale);
    } else {
      lora_out.mul_(scale);
    }
    if (weight.has_value()) {
      y = bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
      y.add_(lora_out);
    } else {
      y = lora_out.to(x.scalar_type());
      if (bias.has_value()) y.add_(*bias);
    }
  } else {
    // Same dtype, no post-dropout: the LoRA term is written first (with the bias),
    // then the base GEMM accumulates onto it in place (beta=1), so no (M, N)
    // temporary exists and the large GEMM reads the small one's result in its epilogue.
    if (bias.has_value()) {
      y = at::addmm(*bias, xa, lora_B.t(), /*beta=*/1, /*alpha=*/scale);
    } else {
      y = at::empty({s.M, s.N}, x.options());
      at::addmm_out(y, y, xa, lora_B.t(), /*beta=*/0, /*alpha=*/scale);
    }
    if (weight.has_value()) y.addmm_(x2, weight->t());
  }
  return {with_leading_shape(y, x), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p,
    c10::string_view dropout_position, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask,
    c10::string_view backend) {
  check_backend(backend);
  const LinearSizes s =
      check_linear_args(x, weight, c10::nullopt, lora_A, lora_B, dropout_p, dropout_position, seed);
  check_scale(scale, x.scalar_type(), lora_A.scalar_type());
  check_linear_backward_args(grad_y, x, xa, lora_A, weight, output_mask, s);
  const auto [need_x, need_weight, need_bias, need_A, need_B] = output_mask;
  const auto lora_dtype = lora_A.scalar_type();
  const bool dropout = dropout_p > 0.0;
  const double keep_scale = 1.0 / (1.0 - dropout_p);

  const at::Tensor g = grad_matrix(grad_y, s.M, s.N);
  const at::Tensor x2 = as_matrix(x, s.M, s.K);

  const bool need_lora_grads = need_A || need_x || need_B;
  if (dropout && s.position == DropoutPosition::kPost) {
    // The masked step, then the rest: the two halves lora::post_dropout_grad_y and
    // lora::linear_backward_from_grad_xa run apart (lora_autograd.cpp releases xa between them).
    at::Tensor grad_xa, grad_B = empty_grad(lora_B);
    if (need_lora_grads) {
      std::tie(grad_xa, grad_B) = post_dropout_step(g, lora_B, xa, scale, *seed, dropout_p, need_A || need_x, need_B,
                                                    post_dropout_partial_bytes_cap(x2, need_x).expect_int());
    }
    auto [grad_x, grad_weight, grad_bias, grad_A] =
        post_dropout_rest(g, x, x2, weight, lora_A, lora_B, grad_xa, need_x, need_weight, need_bias, need_A);
    return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
  }

  at::Tensor grad_x = empty_grad(x), grad_weight = empty_grad(x), grad_bias = empty_grad(x);
  at::Tensor grad_A = empty_grad(lora_A), grad_B = empty_grad(lora_B);
  const bool pre_dropout = dropout && s.position == DropoutPosition::kPre;
  const bool masked_pieces = dropout && use_masked_pieces(x, lora_A);

  at::Tensor grad_xa;         // (M, r): s g B, from every producer below
  bool grad_x_fused = false;  // dx came from a fused input gradient (with grad_xa when dropout-free)
  // dA and dB in one launch once grad_xa is known (below), instead of two cuBLAS GEMMs; or the same
  // kernel's programs in two launches, dA and then dB with grad_xa released, where the one launch
  // would pass the memory budget (split_adapter_grads_for_memory).
  const bool adapter_grads_fused =
      !dropout && need_A && need_B && use_fused_adapter_grads(g, x2, lora_A);
  const bool adapter_grads_apart = adapter_grads_fused && split_adapter_grads_for_memory(g, lora_A);
  const bool adapter_grads_together = adapter_grads_fused && !adapter_grads_apart;
  // dB last, after dx and dA and with grad_xa released (its bytes then hold dB), wherever dB reads only
  // g and xa (as here: 'post' dropout, whose dB needs the mask on g, returned above) and with g in the
  // adapters' dtype (else the converted copy of g would have to live until then). The same GEMMs in
  // another order. (Where the one launch declines at run time, dB joins them below.)
  bool grad_B_last = need_B && !adapter_grads_together && g.scalar_type() == lora_dtype;
  if (need_lora_grads) {
    // Gradient reaching the LoRA term, in the adapters' dtype.
    const at::Tensor g_lora = g.to(lora_dtype);
    if (need_B && !adapter_grads_together && !grad_B_last) grad_B = reduce_over_tokens(g_lora, xa, scale);  // (N, r)
    if (need_x && !dropout && weight.has_value() && use_fused_grad_input(g, *weight, lora_A)) {
      // g is contiguous (above): the fused kernel needs TMA-addressable rows.
      if (auto fused = triton_fused_grad_input(g, *weight, lora_A, lora_B, scale)) {
        grad_x = std::get<0>(*fused).view(x.sizes());
        grad_xa = std::get<1>(*fused);
        grad_x_fused = true;
      }
    }
    if ((need_A || need_x) && !grad_xa.defined()) grad_xa = scaled_mm(g_lora, lora_B, scale);
  }
  if ((need_A || need_x) && pre_dropout && masked_pieces) {
    // One Triton pass over x: dA and the dropped LoRA part of dx, then cuBLAS adds dY W (beta=1).
    at::Tensor masked_grad_x, masked_grad_A;
    std::tie(masked_grad_x, masked_grad_A) =
        triton_masked_up(grad_xa, lora_A, x2, *seed, dropout_p, need_x, need_A);
    if (need_A) grad_A = masked_grad_A;
    if (need_x) {
      if (weight.has_value()) masked_grad_x.addmm_(g, *weight);
      grad_x = masked_grad_x.view(x.sizes());
    }
  } else if (need_A || need_x) {
    // 'pre' with both dA and dx wanted needs the mask twice. On CPU the Philox mask costs
    // ~5 ns/element against ~1 for a pass over memory, so it is generated once, as a
    // (M, K) tensor of kept_scale / 0 (a temporary of this call); on CUDA generating it
    // is cheaper than the extra M x K temporary, so each use regenerates it.
    at::Tensor keep_scale_mask;
    if (pre_dropout && need_A && need_x && x.is_cpu()) {
      // In the adapters' math type (float32 for 16-bit adapters), as dropout_scale_ multiplies: a
      // 16-bit mask would hold 1/(1-p) rounded (bf16 at p = 0.1: 1.109375), and dA and dx would
      // come out ~0.2% small against the forward's drop(x), which rounds once.
      keep_scale_mask = at::ones({s.M, s.K}, lora_A.options().dtype(at::toOpMathType(lora_dtype)));
      dropout_scale_(keep_scale_mask, *seed, dropout_p, keep_scale);
    }
    c10::optional<std::tuple<at::Tensor, at::Tensor>> adapter_grads;
    if (adapter_grads_together) {
      adapter_grads = triton_adapter_grads(grad_xa, x2, xa, g, /*scale_A=*/1.0, scale);
      if (adapter_grads.has_value()) {
        std::tie(grad_A, grad_B) = *adapter_grads;
      } else {  // the kernel declined these tensors: dA just below (its dA programs alone, else the
                // composed way), dB last (g has the adapters' dtype here: use_fused_adapter_grads)
        grad_B_last = true;
      }
    }
    // dA alone in one launch where dB is not computed with it: dB not wanted, dA and dB apart for the
    // memory budget (dB last, below), or the one launch declined at run time; the 'post' backward's
    // masked step, which gives dB, is post_dropout_rest's. The same switch and sizes as both together
    // (NOTES.md #94).
    if (need_A && !adapter_grads.has_value()) {
      c10::optional<at::Tensor> alone;
      if (!pre_dropout && use_fused_adapter_grads(g, x2, lora_A)) {
        alone = triton_grad_A_only(grad_xa, x2, /*scale_A=*/1.0);
      }
      if (alone.has_value()) {
        grad_A = *alone;
      } else {
        at::Tensor x_lora = x2.to(lora_dtype);
        if (keep_scale_mask.defined()) {
          x_lora = (x_lora * keep_scale_mask).to(lora_dtype);  // one rounding, as dropout_scale_'s
        } else if (pre_dropout) {
          x_lora = owned_copy(x2, lora_dtype);
          dropout_scale_(x_lora, *seed, dropout_p, keep_scale);
        }
        grad_A = reduce_over_tokens(grad_xa, x_lora);  // (r, K)
      }
    }
    if (need_x && !grad_x_fused) {
      if (!pre_dropout) {  // no dropout ('post' returned above): the given form where it takes the sizes
        const bool fused = weight.has_value() && fused_grad_input_given(g, *weight, lora_A);
        grad_x = grad_x_given_xa(g, weight, grad_xa, lora_A, lora_B, x.scalar_type(), fused);
      } else {  // 'pre': the LoRA part of dx takes x's mask
        at::Tensor grad_x_lora = at::mm(grad_xa, lora_A);  // (M, K), adapters' dtype
        if (keep_scale_mask.defined()) {
          grad_x_lora.mul_(keep_scale_mask);
        } else {
          dropout_scale_(grad_x_lora, *seed, dropout_p, keep_scale);
        }
        grad_x = add_base_grad_x(g, weight, grad_x_lora, x.scalar_type());
      }
      grad_x = grad_x.view(x.sizes());
    }
  }
  if (grad_B_last) {
    grad_xa = at::Tensor();  // the last reference: the allocator may hand its bytes to dB
    c10::optional<at::Tensor> alone;
    if (adapter_grads_apart) alone = triton_grad_B_only(xa, g, scale);
    grad_B = alone.has_value() ? *alone : reduce_over_tokens(g, xa, scale);  // (N, r)
  }
  if (need_weight) grad_weight = at::mm(g.t(), x2);  // (N, K)
  if (need_bias) grad_bias = g.sum(0);
  return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
}

std::tuple<at::Tensor, at::Tensor> post_dropout_grad_y_aten(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                            const at::Tensor& xa, double scale, double dropout_p,
                                                            const at::Tensor& seed, std::array<bool, 2> output_mask,
                                                            int64_t partial_bytes_cap) {
  const PostStepSizes s = check_post_dropout_grad_y_args(grad_y, lora_B, xa, dropout_p, seed, partial_bytes_cap);
  check_scale(scale, grad_y.scalar_type(), lora_B.scalar_type());
  const at::Tensor g = grad_matrix(grad_y, s.M, s.N);
  const auto [need_grad_xa, need_B] = output_mask;
  if (!need_grad_xa && !need_B) return {empty_grad(xa), empty_grad(lora_B)};
  return post_dropout_step(g, lora_B, xa, scale, seed, dropout_p, need_grad_xa, need_B, partial_bytes_cap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_from_grad_xa_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& grad_xa, std::array<bool, 4> output_mask) {
  const LinearSizes s = check_linear_args(x, weight, c10::nullopt, lora_A, lora_B, 0.0, "post", c10::nullopt);
  const auto [need_x, need_weight, need_bias, need_A] = output_mask;
  check_linear_backward_args(grad_y, x, grad_xa, lora_A, weight, {need_x, need_weight, need_bias, need_A, false}, s,
                             "grad_xa");
  return post_dropout_rest(grad_matrix(grad_y, s.M, s.N), x, as_matrix(x, s.M, s.K), weight, lora_A, lora_B, grad_xa,
                           need_x, need_weight, need_bias, need_A);
}

}  // namespace lora
