// Argument checks shared by every kernel of the lora ops. Each message names the
// argument and the shapes/dtypes involved, so a user sees what to fix.
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

namespace lora {

// Numbers, shapes and devices in messages are formatted here, without std::ostream: a
// stream formats numbers through the process's global C++ locale, and on our H200 image
// that locale's facets can belong to another copy of libstdc++ (loaded by some other
// library in the process) — formatting a number into an error message then crashed the
// process (segfault in std::ostream::_M_insert<double>, seen with scale=inf and a 0-dim
// grad_y) instead of raising. snprintf uses the C locale only.
inline std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string fmt(int64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  return buf;
}
inline std::string fmt(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + fmt(shape[i]);
  return out + "]";
}
inline std::string fmt(const c10::Device& device) {
  std::string out = c10::DeviceTypeName(device.type(), /*lower_case=*/true);
  return device.has_index() ? out + ":" + fmt(static_cast<int64_t>(device.index())) : out;
}
inline const char* fmt(at::ScalarType dtype) { return c10::toString(dtype); }

enum class DropoutPosition { kPre, kPost };

inline DropoutPosition parse_dropout_position(c10::string_view position) {
  if (position == "pre") return DropoutPosition::kPre;
  if (position == "post") return DropoutPosition::kPost;
  TORCH_CHECK_VALUE(false, "lora: dropout_position must be 'pre' or 'post', got '",
                    std::string(position), "'");
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   "lora: ", name, " must be float32, float16, bfloat16 or float64, got ", fmt(dt));
}

// x_name: the tensor the others are held to (x; lora::post_dropout_grad_y's grad_y).
inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name, const char* x_name = "x") {
  TORCH_CHECK(t.device() == x.device(), "lora: ", name, " is on ", fmt(t.device()), " but ", x_name, " is on ",
              fmt(x.device()), "; all tensors must be on one device");
}

// The dropout seed: one int64 on the device of ref (x, or lora::post_dropout_grad_y's grad_y).
inline void check_seed(const at::Tensor& seed, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                   "lora: seed must be an int64 tensor with one element, got ", fmt(seed.scalar_type()), " of shape ",
                   fmt(seed.sizes()));
  check_same_device(seed, ref, "seed", ref_name);
}

// The largest finite value of a floating dtype the ops accept (check_floating).
inline double max_finite(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::max());
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    case at::kFloat: return static_cast<double>(std::numeric_limits<float>::max());
    default: return std::numeric_limits<double>::max();
  }
}

// A non-finite scale (alpha = inf or nan) can only produce garbage, and which garbage
// (inf or nan, where) would differ between backends; it is refused instead. So is a finite one
// past the range of x's or the adapters' dtype: some paths apply it in those dtypes (an in-place
// multiply, s B in the fused GEMM, a float32 GEMM alpha), where it becomes inf, and the output
// would be inf, NaN (0 * inf) or right depending on the path.
inline void check_scale(double scale, at::ScalarType x_dtype, at::ScalarType lora_dtype) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "lora: scale must be a finite number, got ", fmt(scale));
  const at::ScalarType narrow = max_finite(x_dtype) <= max_finite(lora_dtype) ? x_dtype : lora_dtype;
  TORCH_CHECK_VALUE(std::abs(scale) <= max_finite(narrow), "lora: scale ", fmt(scale), " is beyond the range of ",
                    fmt(narrow), " (largest finite value ", fmt(max_finite(narrow)), "), the dtype of x or the adapters");
}

// The ops' `backend` argument: which CUDA implementation runs ("auto" lets lora_ext
// choose); checked on every device so a typo fails everywhere, not only on a GPU.
inline void check_backend(c10::string_view backend) {
  TORCH_CHECK_VALUE(backend == "auto" || backend == "triton" || backend == "native",
                    "lora: backend must be 'auto', 'triton' or 'native', got '", std::string(backend), "'");
}

// Sizes of one lora::linear call, after its arguments were checked.
struct LinearSizes {
  int64_t M;  // tokens: product of x's leading dimensions
  int64_t K;  // in_features
  int64_t N;  // out_features
  int64_t r;  // LoRA rank
  DropoutPosition position;
};

inline LinearSizes check_linear_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, double dropout_p,
                                     c10::string_view dropout_position,
                                     const c10::optional<at::Tensor>& seed) {
  LinearSizes s{};
  s.position = parse_dropout_position(dropout_position);
  TORCH_CHECK(x.dim() >= 1, "lora: x must have at least 1 dimension (..., in_features), got a 0-dim tensor");
  check_floating(x, "x");
  check_floating(lora_A, "lora_A");
  check_floating(lora_B, "lora_B");
  TORCH_CHECK(lora_A.dim() == 2, "lora: lora_A must be 2-D (r, in_features), got shape ", fmt(lora_A.sizes()));
  TORCH_CHECK(lora_B.dim() == 2, "lora: lora_B must be 2-D (out_features, r), got shape ", fmt(lora_B.sizes()));
  TORCH_CHECK_TYPE(lora_A.scalar_type() == lora_B.scalar_type(), "lora: lora_A (", fmt(lora_A.scalar_type()),
                   ") and lora_B (", fmt(lora_B.scalar_type()), ") must have the same dtype");
  check_same_device(lora_A, x, "lora_A");
  check_same_device(lora_B, x, "lora_B");
  s.K = x.size(-1);
  s.r = lora_A.size(0);
  s.M = x.numel() / std::max<int64_t>(s.K, 1);
  if (s.K == 0) {
    s.M = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) s.M *= x.size(d);
  }
  TORCH_CHECK(s.r >= 1, "lora: rank must be >= 1, got lora_A of shape ", fmt(lora_A.sizes()));
  TORCH_CHECK(lora_A.size(1) == s.K, "lora: lora_A.shape[1] must equal x.shape[-1] (in_features=", fmt(s.K),
              "), got lora_A of shape ", fmt(lora_A.sizes()), " and x of shape ", fmt(x.sizes()));
  if (weight.has_value()) {
    const auto& w = *weight;
    check_floating(w, "weight");
    check_same_device(w, x, "weight");
    TORCH_CHECK(w.dim() == 2, "lora: weight must be 2-D (out_features, in_features), got shape ", fmt(w.sizes()));
    TORCH_CHECK(w.size(1) == s.K, "lora: weight.shape[1] must equal x.shape[-1] (", fmt(s.K),
                "), got weight of shape ", fmt(w.sizes()), " and x of shape ", fmt(x.sizes()));
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "lora: weight dtype (", fmt(w.scalar_type()),
                     ") must equal x dtype (", fmt(x.scalar_type()), ")");
    s.N = w.size(0);
  } else {
    s.N = lora_B.size(0);
  }
  TORCH_CHECK(lora_B.size(0) == s.N && lora_B.size(1) == s.r, "lora: lora_B must have shape (out_features=",
              fmt(s.N), ", r=", fmt(s.r), "), got ", fmt(lora_B.sizes()));
  if (bias.has_value()) {
    const auto& b = *bias;
    check_same_device(b, x, "bias");
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "lora: bias dtype (", fmt(b.scalar_type()),
                     ") must equal x dtype (", fmt(x.scalar_type()), ")");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == s.N, "lora: bias must have shape (out_features=", fmt(s.N),
                ",), got ", fmt(b.sizes()));
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "lora: dropout_p must be in [0, 1), got ", fmt(dropout_p));
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), "lora: dropout_p=", fmt(dropout_p), " > 0 needs a seed tensor, got None");
  }
  if (seed.has_value()) check_seed(*seed, x, "x");
  return s;
}

// lora::linear_backward's own arguments (after check_linear_args on the shared ones):
// grad_y and xa must be what lora::linear's autograd would pass. xa_name: the (M, r) argument's name
// in the messages (lora::linear_backward_from_grad_xa's is grad_xa).
inline void check_linear_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& xa,
                                       const at::Tensor& lora_A, const c10::optional<at::Tensor>& weight,
                                       const std::array<bool, 5>& output_mask, const LinearSizes& s,
                                       const char* xa_name = "xa") {
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == s.N && grad_y.numel() == s.M * s.N,
              "lora: grad_y must have shape (..., ", fmt(s.N), ") with ", fmt(s.M), " rows, got ", fmt(grad_y.sizes()));
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "lora: grad_y dtype (", fmt(grad_y.scalar_type()),
                   ") must equal x dtype (", fmt(x.scalar_type()), ")");
  check_same_device(grad_y, x, "grad_y");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == s.M && xa.size(1) == s.r, "lora: ", xa_name, " must have shape (",
              fmt(s.M), ", ", fmt(s.r), "), got ", fmt(xa.sizes()));
  TORCH_CHECK_TYPE(xa.scalar_type() == lora_A.scalar_type(), "lora: ", xa_name, " dtype (", fmt(xa.scalar_type()),
                   ") must equal lora_A dtype (", fmt(lora_A.scalar_type()), ")");
  check_same_device(xa, x, xa_name);
  TORCH_CHECK(!output_mask[1] || weight.has_value(), "lora: grad of weight requested but weight is None");
}

struct PostStepSizes {
  int64_t M, N, r;
};

// lora::post_dropout_grad_y's arguments: grad_y (..., N), lora_B (N, r), xa (M, r) with M grad_y's
// rows, a dropout probability in (0, 1) and its seed.
inline PostStepSizes check_post_dropout_grad_y_args(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                    const at::Tensor& xa, double dropout_p, const at::Tensor& seed,
                                                    int64_t partial_bytes_cap) {
  check_floating(grad_y, "grad_y");
  check_floating(lora_B, "lora_B");
  TORCH_CHECK(grad_y.dim() >= 1, "lora: grad_y must have at least 1 dimension (..., out_features), got a 0-dim tensor");
  TORCH_CHECK(lora_B.dim() == 2, "lora: lora_B must be 2-D (out_features, r), got shape ", fmt(lora_B.sizes()));
  PostStepSizes s{1, lora_B.size(0), lora_B.size(1)};
  for (int64_t d = 0; d + 1 < grad_y.dim(); ++d) s.M *= grad_y.size(d);
  TORCH_CHECK(s.r >= 1, "lora: rank must be >= 1, got lora_B of shape ", fmt(lora_B.sizes()));
  TORCH_CHECK(grad_y.size(-1) == s.N, "lora: grad_y must have shape (..., out_features=", fmt(s.N),
              ") to match lora_B of shape ", fmt(lora_B.sizes()), ", got ", fmt(grad_y.sizes()));
  check_same_device(lora_B, grad_y, "lora_B", "grad_y");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == s.M && xa.size(1) == s.r, "lora: xa must have shape (", fmt(s.M), ", ",
              fmt(s.r), "), got ", fmt(xa.sizes()));
  TORCH_CHECK_TYPE(xa.scalar_type() == lora_B.scalar_type(), "lora: xa dtype (", fmt(xa.scalar_type()),
                   ") must equal lora_B dtype (", fmt(lora_B.scalar_type()), ")");
  check_same_device(xa, grad_y, "xa", "grad_y");
  TORCH_CHECK_VALUE(dropout_p > 0.0 && dropout_p < 1.0, "lora: dropout_p must be in (0, 1), got ", fmt(dropout_p));
  check_seed(seed, grad_y, "grad_y");
  TORCH_CHECK_VALUE(partial_bytes_cap >= 0, "lora: partial_bytes_cap must be >= 0, got ", fmt(partial_bytes_cap));
  return s;
}

}  // namespace lora
