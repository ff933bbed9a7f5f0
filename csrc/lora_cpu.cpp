// CPU kernels of the lora ops: the ATen composition of lora_aten.cpp, plus the
// element-wise dropout step written as a parallel loop over the Philox mask.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "lora_aten.h"
#include "philox.h"

namespace lora {
namespace {

// Elements per mask block: one block's keep flags live on the stack.
constexpr int64_t kMaskBlock = 512;

// keep[j] = dropout_keep(seed, first + j) for j < count. Whole groups of eight elements share
// one Philox evaluation (philox.h); the group loop has no branches, so the compiler vectorises
// it (32x32->64-bit multiplies). target_clones builds an AVX2 and an AVX-512 variant next to
// the baseline one and picks at load time, so the wheel still runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void dropout_keep_block(uint64_t seed, uint64_t first, int64_t count, uint32_t threshold, uint8_t* keep) {
  int64_t j = 0;
  for (; j < count && ((first + static_cast<uint64_t>(j)) % kMaskGroup) != 0; ++j) {  // up to a group boundary
    keep[j] = dropout_keep(seed, first + static_cast<uint64_t>(j), threshold) ? 1 : 0;
  }
  const int64_t groups = (count - j) / kMaskGroup;
  const uint64_t first_group = (first + static_cast<uint64_t>(j)) / kMaskGroup;
  uint8_t* group_keep = keep + j;
  for (int64_t g = 0; g < groups; ++g) {
    dropout_keep_group(seed, first_group + static_cast<uint64_t>(g), threshold, group_keep + kMaskGroup * g);
  }
  for (j += kMaskGroup * groups; j < count; ++j) {  // the last partial group
    keep[j] = dropout_keep(seed, first + static_cast<uint64_t>(j), threshold) ? 1 : 0;
  }
}

}  // namespace

void dropout_scale_cpu_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale) {
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = dropout_threshold(p);
  const int64_t n = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lora_dropout_scale_cpu", [&] {
    scalar_t* data = t.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale_value = static_cast<acc_t>(kept_scale);
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      uint8_t keep[kMaskBlock];
      for (int64_t block = begin; block < end; block += kMaskBlock) {
        const int64_t count = std::min(kMaskBlock, end - block);
        dropout_keep_block(seed_value, static_cast<uint64_t>(block), count, threshold, keep);
        scalar_t* values = data + block;
        for (int64_t j = 0; j < count; ++j) {
          // Multiplying by 0 (rather than writing 0) lets a dropped NaN/Inf stay NaN, as in
          // torch.nn.functional.dropout and lora_ext.reference: a divergence is never hidden.
          values[j] = static_cast<scalar_t>(static_cast<acc_t>(values[j]) * (keep[j] ? scale_value : acc_t(0)));
        }
      }
    });
  });
}

TORCH_LIBRARY_IMPL(lora, CPU, m) {
  m.impl("linear", &linear_forward_aten);
  m.impl("linear_backward", &linear_backward_aten);
  m.impl("post_dropout_grad_y", &post_dropout_grad_y_aten);
  m.impl("linear_backward_from_grad_xa", &linear_backward_from_grad_xa_aten);
}

}  // namespace lora
