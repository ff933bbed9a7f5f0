// CPU kernels of the lora ops: the ATen composition of lora_aten.cpp, plus the
// element-wise dropout step written as a parallel loop over the Philox mask.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "lora_aten.h"
#include "philox.h"

namespace lora {

void dropout_scale_cpu_(at::Tensor& t, const at::Tensor& seed, double p, double kept_scale) {
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = dropout_threshold(p);
  const int64_t n = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lora_dropout_scale_cpu", [&] {
    scalar_t* data = t.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale_value = static_cast<acc_t>(kept_scale);
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Multiplying by 0 (rather than writing 0) lets a dropped NaN/Inf stay NaN, as in
        // torch.nn.functional.dropout and lora_ext.reference: a divergence is never hidden.
        const bool keep = dropout_keep(seed_value, static_cast<uint64_t>(i), threshold);
        data[i] = static_cast<scalar_t>(static_cast<acc_t>(data[i]) * (keep ? scale_value : acc_t(0)));
      }
    });
  });
}

TORCH_LIBRARY_IMPL(lora, CPU, m) {
  m.impl("linear", &linear_forward_aten);
  m.impl("linear_backward", &linear_backward_aten);
}

}  // namespace lora
