// The lora operator family: every schema, in one place.
//
//   lora::linear            y = x W^T + b + LoRA(x), returns (y, xa) with xa = drop?(x) A^T (M x r),
//                           which autograd saves instead of anything activation-sized.
//   lora::linear_backward   every gradient of lora::linear, computing only those in output_mask
//                           (x, weight, bias, lora_A, lora_B); unneeded ones come back as empty tensors.
//   lora::post_dropout_grad_y, lora::linear_backward_from_grad_xa
//                           linear_backward with 'post' dropout in two halves: the masked step
//                           (grad_xa = s drop(dY) B, dB = s drop(dY)^T xa), then dx, dW, db, dA from
//                           grad_xa. The autograd calls them apart to free xa between them (a peak
//                           of M x r less; lora_autograd.cpp); their bits are linear_backward's.
//                           Kernels on CPU and on the native CUDA path only (not the Triton backend).
//
// Kernels: CPU in lora_cpu.cpp; CUDA in cuda/lora_cuda.cu (native, choosing Triton by the rule in
// use_triton) when built with CUDA, else registered from Python (lora_ext/kernels/cuda_dispatch.py,
// Triton only); autograd in lora_autograd.cpp; fake kernels in lora_ext/ops.py.
#include <torch/extension.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "lora_aten.h"
#include "masked_grad_y_grid.h"
#include "triton_bridge.h"
#include "triton_replay.h"

#if defined(__GLIBC__)
#include <execinfo.h>
#include <unistd.h>
#endif

TORCH_LIBRARY(lora, m) {
  m.def(
      "linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
      "float dropout_p=0., str dropout_position=\"post\", Tensor? seed=None, str backend=\"auto\") "
      "-> (Tensor, Tensor)");
  m.def(
      "linear_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
      "float scale, float dropout_p, str dropout_position, Tensor? seed, bool[5] output_mask, "
      "str backend=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "post_dropout_grad_y(Tensor grad_y, Tensor lora_B, Tensor xa, float scale, float dropout_p, Tensor seed, "
      "bool[2] output_mask, SymInt partial_bytes_cap=0) -> (Tensor, Tensor)");
  m.def(
      "linear_backward_from_grad_xa(Tensor grad_y, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, "
      "Tensor grad_xa, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
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

// lora_ext.kernels.cuda_dispatch.fused_forward_callback / fused_grad_input_callback /
// adapter_grads_callback: the dropout-free forward and input gradient as one Triton GEMM each,
// and both adapter gradients in one launch.
pybind11::object* triton_fused_forward_fn = nullptr;
pybind11::object* triton_fused_grad_input_fn = nullptr;
pybind11::object* triton_adapter_grads_fn = nullptr;
pybind11::object* triton_fused_grad_input_given_xa_fn = nullptr;
pybind11::object* triton_grad_A_only_fn = nullptr;
pybind11::object* triton_grad_B_only_fn = nullptr;

void set_triton_fused_gemms(pybind11::object forward_fn, pybind11::object grad_input_fn,
                            pybind11::object adapter_grads_fn, pybind11::object grad_input_given_xa_fn,
                            pybind11::object grad_A_only_fn, pybind11::object grad_B_only_fn) {
  triton_fused_forward_fn = new pybind11::object(std::move(forward_fn));
  triton_fused_grad_input_fn = new pybind11::object(std::move(grad_input_fn));
  triton_adapter_grads_fn = new pybind11::object(std::move(adapter_grads_fn));
  triton_fused_grad_input_given_xa_fn = new pybind11::object(std::move(grad_input_given_xa_fn));
  triton_grad_A_only_fn = new pybind11::object(std::move(grad_A_only_fn));
  triton_grad_B_only_fn = new pybind11::object(std::move(grad_B_only_fn));
}

pybind11::object* triton_masked_down_fn = nullptr;
pybind11::object* triton_masked_grad_y_fn = nullptr;
pybind11::object* triton_masked_up_fn = nullptr;
pybind11::object* record_piece_fn = nullptr;  // lora_ext.kernels.replay.record

void set_triton_masked_pieces(pybind11::object down_fn, pybind11::object grad_y_fn, pybind11::object up_fn,
                              pybind11::object record_fn) {
  triton_masked_down_fn = new pybind11::object(std::move(down_fn));
  triton_masked_grad_y_fn = new pybind11::object(std::move(grad_y_fn));
  triton_masked_up_fn = new pybind11::object(std::move(up_fn));
  record_piece_fn = new pybind11::object(std::move(record_fn));
}

// ---------------------------------------------------------------------------
// Replay of the Triton pieces' launches from C++ (triton_replay.h). The first call
// with a new key runs in Python, recorded; later calls with that key are replayed.
// ---------------------------------------------------------------------------

// Keys whose recording gave no recipe map to nullptr (they stay on the Python route).
// Bounded: beyond kMaxRecipes keys (e.g. a new token count every step), new keys run in Python.
constexpr size_t kMaxRecipes = 4096;
std::mutex recipes_mutex;
std::unordered_map<std::string, std::shared_ptr<lora::replay::Recipe>>* recipes =
    new std::unordered_map<std::string, std::shared_ptr<lora::replay::Recipe>>();
std::atomic<bool> replay_enabled{[] {
  const char* env = std::getenv("LORA_EXT_TRITON_REPLAY");
  return env == nullptr || std::string(env) != "0";
}()};
std::atomic<int64_t> replay_count{0};

bool set_triton_replay(bool enabled) { return replay_enabled.exchange(enabled); }  // the previous setting, as set_fused_*

// (recipes recorded, keys left on the Python route, calls replayed)
std::tuple<int64_t, int64_t, int64_t> triton_replay_stats() {
  std::lock_guard<std::mutex> lock(recipes_mutex);
  int64_t recorded = 0, python_route = 0;  // keys a piece declined are neither
  for (const auto& entry : *recipes) {
    recorded += entry.second != nullptr && !entry.second->declined;
    python_route += entry.second == nullptr;
  }
  return {recorded, python_route, replay_count.load()};
}

// A piece's argument: a tensor, a float or a flag, in its Python position.
struct PieceArg {
  at::Tensor tensor;
  double real = 0.0;
  bool flag = false;
  enum class Kind { kTensor, kReal, kFlag } kind;
  PieceArg(const at::Tensor& t) : tensor(t), kind(Kind::kTensor) {}  // NOLINT: implicit by design
  PieceArg(const c10::optional<at::Tensor>& t) : tensor(t.value_or(at::Tensor())), kind(Kind::kTensor) {}  // NOLINT: None: undefined
  PieceArg(double v) : real(v), kind(Kind::kReal) {}                 // NOLINT
  PieceArg(bool v) : flag(v), kind(Kind::kFlag) {}                    // NOLINT
  pybind11::object to_python() const {
    switch (kind) {
      case Kind::kTensor: return pybind11::cast(tensor);
      case Kind::kReal: return pybind11::float_(real);
      case Kind::kFlag: return pybind11::bool_(flag);
    }
    return pybind11::none();
  }
};

// Everything that fixes what a piece launches: for each tensor its dtype, device, sizes,
// strides and whether its address is 16-byte aligned (Triton specialises on that), and
// the scalars and flags.
[[maybe_unused]] std::string replay_key(const char* piece, const std::vector<PieceArg>& args) {
  std::string key(piece);
  auto add = [&key](int64_t v) { key += ','; key += std::to_string(v); };
  for (const PieceArg& arg : args) {
    key += '|';
    switch (arg.kind) {
      case PieceArg::Kind::kTensor: {
        const at::Tensor& t = arg.tensor;
        if (!t.defined()) {  // None
          add(-1);
          break;
        }
        add(static_cast<int64_t>(t.scalar_type()));
        add(t.device().index());
        for (int64_t size : t.sizes()) add(size);
        key += ';';
        for (int64_t stride : t.strides()) add(stride);
        add(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0);
        break;
      }
      case PieceArg::Kind::kReal: {
        int64_t bits = 0;
        std::memcpy(&bits, &arg.real, sizeof bits);
        add(bits);
        break;
      }
      case PieceArg::Kind::kFlag:
        add(arg.flag);
        break;
    }
  }
  return key;
}

// The recipe of replay.record (lora_ext/kernels/replay.py) in C++ form.
std::shared_ptr<lora::replay::Recipe> parse_recipe(const pybind11::object& recipe,
                                                   const std::vector<at::Tensor>& outputs) {
  using lora::replay::Arg;
  auto parsed = std::make_shared<lora::replay::Recipe>();
  for (const at::Tensor& t : outputs) parsed->outputs.push_back({t.sizes().vec(), t.options()});
  auto parts = recipe.cast<pybind11::tuple>();
  for (const auto& temp : parts[0].cast<pybind11::list>()) {
    const auto t = temp.cast<at::Tensor>();
    parsed->temps.push_back({t.sizes().vec(), t.options()});
  }
  for (const auto& item : parts[1].cast<pybind11::list>()) {
    auto fields = item.cast<pybind11::tuple>();
    lora::replay::Launch launch;
    launch.cubin = fields[0].cast<std::string>();
    launch.name = fields[1].cast<std::string>();
    launch.num_warps = fields[2].cast<int>();
    launch.shared_bytes = fields[3].cast<int>();
    auto grid = fields[4].cast<pybind11::tuple>();
    for (int d = 0; d < 3; ++d) launch.grid[d] = grid[d].cast<unsigned>();
    for (const auto& spec : fields[5].cast<pybind11::list>()) {
      auto kind_value = spec.cast<pybind11::tuple>();
      const auto kind = kind_value[0].cast<std::string>();
      Arg arg{Arg::Kind::kInput};
      auto tensor_kind = [](const std::string& name) {
        TORCH_INTERNAL_ASSERT(name == "input" || name == "output" || name == "temp");
        return name == "input" ? Arg::Kind::kInput : name == "output" ? Arg::Kind::kOutput : Arg::Kind::kTemp;
      };
      if (kind == "tensormap") {  // ("tensormap", base kind, base index, encoding): replay._tensor_map
        arg.kind = Arg::Kind::kTensorMap;
        arg.base = tensor_kind(kind_value[1].cast<std::string>());
        arg.integer = kind_value[2].cast<int64_t>();
        auto encoding = kind_value[3].cast<pybind11::tuple>();
        arg.map.data_type = encoding[0].cast<uint32_t>();
        arg.map.dims = encoding[1].cast<std::vector<uint64_t>>();
        arg.map.byte_strides = encoding[2].cast<std::vector<uint64_t>>();
        arg.map.box = encoding[3].cast<std::vector<uint32_t>>();
        arg.map.swizzle = encoding[4].cast<int>();
        arg.map.fill = encoding[5].cast<int>();
        TORCH_INTERNAL_ASSERT(arg.map.box.size() == arg.map.dims.size() &&
                              arg.map.byte_strides.size() + 1 == arg.map.dims.size());
        ++launch.tensor_maps;
      } else if (kind == "fp32") {
        arg.kind = Arg::Kind::kFloat32;
        arg.real = kind_value[1].cast<float>();
      } else {
        arg.integer = kind_value[1].cast<int64_t>();
        if (kind == "i32" || kind == "i64") {
          arg.kind = kind == "i32" ? Arg::Kind::kInt32 : Arg::Kind::kInt64;
        } else {
          arg.kind = tensor_kind(kind);
        }
      }
      launch.args.push_back(arg);
    }
    parsed->launches.push_back(std::move(launch));
  }
  return parsed;
}

// Runs piece `fn` on `args`: replayed from its recipe when one exists for the key, else in
// Python (recorded first when the key is new). nullopt where the piece returned None (it
// declined these inputs: the fused forward); a key it declined once is declined from then on
// without Python (what a piece accepts depends only on what the key holds).
c10::optional<std::vector<at::Tensor>> run_piece(const char* piece, pybind11::object* fn,
                                                 const std::vector<PieceArg>& args) {
#ifdef LORA_WITH_CUDA
  // Only 16-bit adapters (the fused GEMMs: weights): with float32 ones the kernels also
  // depend on torch's TF32 setting.
  const at::ScalarType lora_dtype = args.at(1).tensor.scalar_type();
  // And non-empty tensors only: with an empty one a piece may fill an output without a launch (zero_).
  bool replayable =
      replay_enabled && record_piece_fn != nullptr && (lora_dtype == at::kHalf || lora_dtype == at::kBFloat16);
  for (const PieceArg& arg : args) replayable = replayable && (!arg.tensor.defined() || arg.tensor.numel() > 0);
  std::string key;
  if (replayable) {
    key = replay_key(piece, args);
    std::shared_ptr<lora::replay::Recipe> recipe;
    bool known = false;
    {
      std::lock_guard<std::mutex> lock(recipes_mutex);
      auto found = recipes->find(key);
      known = found != recipes->end();
      if (known) recipe = found->second;
    }
    if (recipe != nullptr && recipe->declined) return c10::nullopt;
    if (recipe != nullptr) {
      std::vector<at::Tensor> inputs;
      for (const PieceArg& arg : args) inputs.push_back(arg.tensor);
      ++replay_count;
      return lora::replay::run(*recipe, inputs);
    }
    if (known) key.clear();  // recorded before without a recipe: plain Python call
  }
#else
  const std::string key;
#endif
  pybind11::gil_scoped_acquire gil;
  pybind11::tuple py_args(args.size());
  for (size_t i = 0; i < args.size(); ++i) py_args[i] = args[i].to_python();
  if (key.empty()) {
    pybind11::object result = (*fn)(*py_args);
    if (result.is_none()) return c10::nullopt;
    if (pybind11::isinstance<pybind11::tuple>(result)) return result.cast<std::vector<at::Tensor>>();
    return std::vector<at::Tensor>{result.cast<at::Tensor>()};
  }
  auto recorded = (*record_piece_fn)(*fn, py_args).cast<pybind11::tuple>();
  std::shared_ptr<lora::replay::Recipe> recipe;
  c10::optional<std::vector<at::Tensor>> outputs;
  if (recorded[0].is_none()) {
    recipe = std::make_shared<lora::replay::Recipe>();
    recipe->declined = true;
  } else {
    outputs = recorded[0].cast<std::vector<at::Tensor>>();
    if (!recorded[1].is_none()) recipe = parse_recipe(recorded[1], *outputs);
  }
  std::lock_guard<std::mutex> lock(recipes_mutex);
  if (recipes->size() < kMaxRecipes) recipes->emplace(key, std::move(recipe));
  return outputs;
}

// The two outputs of a fused GEMM piece, or nullopt where it declined.
c10::optional<std::tuple<at::Tensor, at::Tensor>> as_pair(const c10::optional<std::vector<at::Tensor>>& outputs) {
  if (!outputs.has_value()) return c10::nullopt;
  return std::make_tuple(outputs->at(0), outputs->at(1));
}

// A masked piece always computes (it never declines).
std::vector<at::Tensor> run_masked_piece(const char* piece, pybind11::object* fn, const std::vector<PieceArg>& args) {
  auto outputs = run_piece(piece, fn, args);
  TORCH_INTERNAL_ASSERT(outputs.has_value(), "lora: masked piece ", piece, " returned None");
  return std::move(*outputs);
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

bool triton_fused_gemms_registered() { return triton_fused_forward_fn != nullptr; }

c10::optional<std::tuple<at::Tensor, at::Tensor>> triton_fused_forward(const at::Tensor& x2, const at::Tensor& weight,
                                                                       const c10::optional<at::Tensor>& bias,
                                                                       const at::Tensor& lora_A,
                                                                       const at::Tensor& lora_B, double scale,
                                                                       double post_dropout_p,
                                                                       const c10::optional<at::Tensor>& seed) {
  return as_pair(run_piece("fused_forward", triton_fused_forward_fn,
                           {x2, weight, bias, lora_A, lora_B, scale, post_dropout_p, seed}));
}

c10::optional<std::tuple<at::Tensor, at::Tensor>> triton_fused_grad_input(const at::Tensor& g2,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& lora_A,
                                                                          const at::Tensor& lora_B, double scale) {
  return as_pair(run_piece("fused_grad_input", triton_fused_grad_input_fn, {g2, weight, lora_A, lora_B, scale}));
}

c10::optional<at::Tensor> triton_fused_grad_input_given_xa(const at::Tensor& g2, const at::Tensor& weight,
                                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                           const at::Tensor& grad_xa) {
  auto outputs = run_piece("fused_grad_input_given_xa", triton_fused_grad_input_given_xa_fn,
                           {g2, weight, lora_A, lora_B, grad_xa});
  if (!outputs.has_value()) return c10::nullopt;
  return outputs->at(0);
}

c10::optional<at::Tensor> triton_grad_A_only(const at::Tensor& grad_xa, const at::Tensor& x2, double scale_A) {
  auto outputs = run_piece("grad_A_only", triton_grad_A_only_fn, {grad_xa, x2, scale_A});
  if (!outputs.has_value()) return c10::nullopt;
  return outputs->at(0);
}

c10::optional<at::Tensor> triton_grad_B_only(const at::Tensor& xa, const at::Tensor& g2, double scale_B) {
  auto outputs = run_piece("grad_B_only", triton_grad_B_only_fn, {xa, g2, scale_B});
  if (!outputs.has_value()) return c10::nullopt;
  return outputs->at(0);
}

c10::optional<std::tuple<at::Tensor, at::Tensor>> triton_adapter_grads(const at::Tensor& grad_xa, const at::Tensor& x2,
                                                                       const at::Tensor& xa, const at::Tensor& g2,
                                                                       double scale_A, double scale_B) {
  return as_pair(run_piece("adapter_grads", triton_adapter_grads_fn, {grad_xa, x2, xa, g2, scale_A, scale_B}));
}

bool triton_masked_pieces_registered() { return triton_masked_down_fn != nullptr; }

at::Tensor triton_masked_down(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& seed, double p) {
  return run_masked_piece("down", triton_masked_down_fn, {x2, lora_A, seed, p}).at(0);
}

std::tuple<at::Tensor, at::Tensor> triton_masked_grad_y(const at::Tensor& g2, const at::Tensor& lora_B,
                                                        const at::Tensor& xa, double scale, const at::Tensor& seed,
                                                        double p, bool need_grad_xa, bool need_grad_B) {
  auto out = run_masked_piece("grad_y", triton_masked_grad_y_fn,
                              {g2, lora_B, xa, scale, seed, p, need_grad_xa, need_grad_B});
  return {out.at(0), out.at(1)};
}

std::tuple<at::Tensor, at::Tensor> triton_masked_up(const at::Tensor& grad_xa, const at::Tensor& lora_A,
                                                    const at::Tensor& x2, const at::Tensor& seed, double p,
                                                    bool need_x, bool need_A) {
  auto out = run_masked_piece("up", triton_masked_up_fn, {grad_xa, lora_A, x2, seed, p, need_x, need_A});
  return {out.at(0), out.at(1)};
}

}  // namespace lora

namespace {

// LORA_EXT_TERMINATE_BACKTRACE=1: a std::terminate anywhere in the process first prints the C++
// stack (glibc's backtrace; exported symbols only) to stderr, then runs the handler it replaced.
// A diagnostic for aborts with no Python frame to show, such as the GPU suite's
// "terminate called without an active exception" at a subprocess's exit (benchmarks/NOTES.md #39).
std::terminate_handler replaced_terminate_handler = nullptr;

[[noreturn]] void terminate_with_backtrace() {
#if defined(__GLIBC__)
  static const char header[] = "lora_ext: std::terminate called; C++ stack (LORA_EXT_TERMINATE_BACKTRACE=1):\n";
  void* frames[64];
  const int count = backtrace(frames, 64);
  ssize_t ignored = write(STDERR_FILENO, header, sizeof(header) - 1);
  (void)ignored;
  backtrace_symbols_fd(frames, count, STDERR_FILENO);
#endif
  if (replaced_terminate_handler != nullptr) replaced_terminate_handler();
  std::abort();
}

void install_terminate_backtrace_if_asked() {
  const char* env = std::getenv("LORA_EXT_TERMINATE_BACKTRACE");
  if (env == nullptr || std::string(env) != "1") return;
#if defined(__GLIBC__)
  // The first backtrace() loads libgcc_s (dlopen, malloc): do it now, not inside a terminate that
  // may come with the heap in a bad state.
  void* warm[1];
  (void)backtrace(warm, 1);
#endif
  replaced_terminate_handler = std::set_terminate(terminate_with_backtrace);
}

}  // namespace

// The Python module: build facts and the registration of the Triton callbacks
// (lora_ext/kernels/cuda_dispatch.py). The ops themselves are torch.ops.lora.*.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lora_ext C++/CUDA kernels; the ops are torch.ops.lora.*";
  install_terminate_backtrace_if_asked();
  module.def("has_cuda", &built_with_cuda, "True when the native CUDA kernels were compiled in");
  module.def("set_triton_kernels", &set_triton_kernels,
             "Registers the Triton forward/backward the C++ CUDA kernels call for backend 'triton'");
  module.def("set_triton_masked_pieces", &set_triton_masked_pieces,
             "Registers the Triton masked thin products the native CUDA path uses for its dropout steps, and the "
             "recorder whose recipes C++ replays (lora_ext/kernels/replay.py)");
  module.def("set_triton_fused_gemms", &set_triton_fused_gemms,
             "Registers the fused Triton GEMMs the native CUDA path runs for k/v-sized layers and few-token "
             "forwards "
             "(lora_ext/kernels/cuda_dispatch.py fused_forward_callback: (y, xa), with 'post' dropout too; "
             "fused_grad_input_callback: (dx, s g B), adapter_grads_callback: (dA, dB), "
             "fused_grad_input_given_xa_callback: (dx,) with grad_xa given, 'post' dropout's or s g B, "
             "grad_A_only_callback: (dA,), grad_B_only_callback: (dB,); each None "
             "where it does not apply)");
  module.def("set_fused_forward", &lora::set_fused_forward,
             "Turns the native CUDA path's fused Triton forward on or off; returns the previous setting "
             "(on by default; LORA_EXT_FUSED_FORWARD=0: off at import)");
  module.def("set_fused_small_m_forward", &lora::set_fused_small_m_forward,
             "Turns the native CUDA path's fused Triton forward for few tokens (up to 16 rows and 8192 inputs, "
             "dropout-free: one launch for x W^T + b and the LoRA term, before the few-token kernel) on or off; "
             "returns the previous setting (on by default; LORA_EXT_FUSED_SMALL_M_FORWARD=0: off at import)");
  module.def("set_fused_grad_input", &lora::set_fused_grad_input,
             "Turns the native CUDA path's fused Triton input gradient on or off; returns the previous setting "
             "(on by default; LORA_EXT_FUSED_GRAD_INPUT=0: off at import)");
  module.def("set_fused_adapter_grads", &lora::set_fused_adapter_grads,
             "Turns the native CUDA path's one-launch Triton adapter gradients on or off; returns the previous "
             "setting (on by default: dA and dB together, or dA alone, at any width for r <= 16, else up to "
             "2048 outputs at r <= 64; LORA_EXT_FUSED_ADAPTER_GRADS=0: off at import)");
  module.def("set_fused_adapter_grads_any_width_max_rank", &lora::set_fused_adapter_grads_any_width_max_rank,
             "The largest rank at which the native CUDA path's one launch computes dA and dB together (or dA "
             "alone) at any width (16 by default; up to 64; 0: never past 2048 outputs); returns the previous value");
  module.def("set_adapter_grads_memory_budget", &lora::set_adapter_grads_memory_budget,
             "The memory budget of the native CUDA path's dropout-free adapter gradients: where the one "
             "launch's xa, grad_xa, dA and dB pass it and dA, then dB with grad_xa released, fit it, the two run "
             "apart (1 MiB by default; 0: always one launch; not a cap: where two launches pass it too, one runs); "
             "returns the previous value (benchmarks/NOTES.md #58)");
  module.def("set_fused_post_dropout", &lora::set_fused_post_dropout,
             "Turns the native CUDA path's fused Triton GEMMs with 'post' dropout (the forward with the mask in "
             "its epilogue, the input gradient with the masked step's grad_xa) on or off; returns the previous "
             "setting (on by default; LORA_EXT_FUSED_POST_DROPOUT=0: off at import)");
  module.def("fused_post_dropout_enabled", &lora::fused_post_dropout_on,
             "Whether the fused Triton GEMMs with 'post' dropout are on (set_fused_post_dropout)");
  module.def("set_triton_replay", &set_triton_replay,
             "Turns the C++ replay of recorded Triton pieces on or off (LORA_EXT_TRITON_REPLAY=0: off); returns the "
             "previous setting");
  module.def("triton_replay_stats", &triton_replay_stats,
             "(recipes recorded, keys left on the Python route, calls replayed)");
  module.def("set_small_m_forward", &lora::set_small_m_forward,
             "Turns the op's few-token CUDA forward (csrc/cuda/small_m_forward.cu) on or off; returns the previous "
             "setting (LORA_EXT_SMALL_M_FORWARD=0: off at import)");
  // Host arithmetic only, so in every build: tests check it against a brute-force search on CPU.
  module.def(
      "masked_grad_y_grid",
      [](int64_t M, int64_t C, int64_t r, int64_t slots, int64_t max_partial_bytes, const std::string& rule) {
        TORCH_CHECK(M > 0 && C > 0 && slots > 0, "lora: masked_grad_y_grid needs M, C and slots > 0, got ", M, ", ",
                    C, ", ", slots);
        TORCH_CHECK(r >= 1 && r <= 64, "lora: masked_grad_y_grid takes r in [1, 64], got ", r);
        lora::MaskedGradYGridRule grid_rule;
        TORCH_CHECK(lora::masked_grad_y_grid_rule_named(rule, &grid_rule),
                    "lora: masked_grad_y_grid's rule is 'balanced' or 'sqrt', got '", rule, "'");
        const lora::MaskedGradYGrid grid =
            lora::masked_grad_y_grid(grid_rule, M, C, lora::masked_rank_pad(r), slots, max_partial_bytes);
        return pybind11::dict(pybind11::arg("m_groups") = grid.m_groups, pybind11::arg("c_groups") = grid.c_groups,
                              pybind11::arg("blocks_m_per_group") = grid.blocks_m_per_group,
                              pybind11::arg("blocks_c_per_group") = grid.blocks_c_per_group,
                              pybind11::arg("partial_bytes") = grid.partial_bytes);
      },
      "How the native 'post' backward step splits an (M, C) dY at rank r over `slots` resident programs "
      "(csrc/masked_grad_y_grid.h): dict of m_groups, c_groups, blocks per group and the float32 partials' bytes",
      pybind11::arg("M"), pybind11::arg("C"), pybind11::arg("r"), pybind11::arg("slots"),
      pybind11::arg("max_partial_bytes") = 0, pybind11::arg("rule") = "balanced");
#ifdef LORA_WITH_CUDA
  module.def("masked_grad_y_cuda_supports", &lora::masked_grad_y_cuda_supports,
             "Whether masked_grad_y_cuda takes these (g2, lora_B, xa)");
  module.def("set_masked_grad_y_stages", &lora::set_masked_grad_y_stages,
             "The native 'post' backward step's load scheme: 0 (registers one tile ahead, default) or 3 (cp.async "
             "ring of three shared-memory tiles, three programs per SM at r <= 16, so other sums and bits there; "
             "off by default, measured no faster than the register loads under the balanced split (benchmarks/NOTES.md #56), "
             "LORA_EXT_MASKED_GRAD_Y_STAGES=3 at import); returns the "
             "previous one");
  module.def("set_masked_grad_y_grid_rule", &lora::set_masked_grad_y_grid_rule,
             "How the native 'post' backward step splits its work (csrc/masked_grad_y_grid.h): 'balanced' (default) "
             "or 'sqrt' (the first rule, for A/B measurements; LORA_EXT_MASKED_GRAD_Y_GRID=sqrt at import); returns "
             "the previous one");
  module.def("masked_grad_y_cuda", &lora::masked_grad_y_cuda,
             "(s drop(g2) B, s drop(g2)^T xa): the native 'post' dropout backward step (csrc/cuda/masked_grad_y.cu); "
             "max_partial_bytes caps its float32 partials (0: no larger than the first grid rule's)",
             pybind11::arg("g2"), pybind11::arg("lora_B"), pybind11::arg("xa"), pybind11::arg("scale"),
             pybind11::arg("seed"), pybind11::arg("p"), pybind11::arg("need_grad_xa"), pybind11::arg("need_grad_B"),
             pybind11::arg("max_partial_bytes") = 0);
  module.def("small_m_forward_cuda_supports", &lora::small_m_forward_cuda_supports,
             "Whether small_m_forward_cuda takes these (x2, lora_A, lora_B)");
  module.def("small_m_forward_cluster_blocks", &lora::small_m_forward_cluster_blocks,
             "Blocks per thread-block cluster small_m_forward_cuda launches for these (x2, lora_A, lora_B): 8, or 16 "
             "where K is long (csrc/cuda/small_m_forward.cu)");
  module.def("small_m_forward_cuda", &lora::small_m_forward_cuda,
             "xa <- x2 A^T and y += s xa B^T in place: the few-token forward's LoRA term (csrc/cuda/small_m_forward.cu)",
             pybind11::arg("x2"), pybind11::arg("lora_A"), pybind11::arg("lora_B"), pybind11::arg("y"),
             pybind11::arg("xa"), pybind11::arg("scale"));
#endif
}
