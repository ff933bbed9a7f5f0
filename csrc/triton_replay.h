// Replaying the recorded Triton launches of a piece without Python
// (lora_ext/kernels/replay.py records them; lora.cpp keeps the recipes by key).
// The replay itself is CUDA-only (csrc/cuda/triton_replay.cu): it allocates the outputs
// and temporaries and launches the recorded cubins with the driver API, looked up at run
// time in the already loaded driver library, so _C.so does not link libcuda.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace lora {
namespace replay {

// A host-side TMA descriptor (a CUtensorMap parameter): the arguments of
// cuTensorMapEncodeTiled except the address, innermost dimension first.
struct TensorMapSpec {
  uint32_t data_type = 0;  // CUtensorMapDataType
  std::vector<uint64_t> dims;
  std::vector<uint64_t> byte_strides;  // of dims 1.. (one fewer than dims)
  std::vector<uint32_t> box;
  int swizzle = 0;  // CUtensorMapSwizzle
  int fill = 0;     // CUtensorMapFloatOOBfill
};

struct Arg {
  // kTensorMap: a tensor map over input / output / temporary `integer` (of kind `base`),
  // encoded per call with that tensor's address.
  enum class Kind : uint8_t { kInput, kOutput, kTemp, kInt32, kInt64, kFloat32, kTensorMap };
  Kind kind;
  int64_t integer = 0;  // the input position / output / temporary index, or the value
  float real = 0.0f;
  Kind base = Kind::kInput;  // kTensorMap: which kind of tensor `integer` indexes
  TensorMapSpec map;
};

struct Launch {
  std::string cubin;  // until the first replay loads it (then emptied: loaded functions are shared by cubin)
  std::string name;
  int num_warps = 4;
  int shared_bytes = 0;
  std::array<unsigned, 3> grid{1, 1, 1};
  std::vector<Arg> args;
  int tensor_maps = 0;  // how many of args are kTensorMap
  void* function = nullptr;  // CUfunction, loaded on the first replay (guarded by Recipe::load_mutex)
};

struct TensorSpec {
  std::vector<int64_t> sizes;
  at::TensorOptions options;
};

struct Recipe {
  bool declined = false;  // the piece returned None for this key: nothing to replay, no outputs
  std::vector<TensorSpec> outputs, temps;
  std::vector<Launch> launches;
  std::mutex load_mutex;
};

// The outputs of one call. inputs[i] is the piece's argument at Python position i
// (undefined where that argument is not a tensor).
std::vector<at::Tensor> run(Recipe& recipe, const std::vector<at::Tensor>& inputs);

}  // namespace replay
}  // namespace lora
