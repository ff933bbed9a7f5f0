// Replaying the recorded Triton launches of a masked piece without Python
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

struct Arg {
  enum class Kind : uint8_t { kInput, kOutput, kTemp, kInt32, kInt64, kFloat32 };
  Kind kind;
  int64_t integer = 0;  // the input position / output / temporary index, or the value
  float real = 0.0f;
};

struct Launch {
  std::string cubin;  // until the first replay loads it (then emptied: loaded functions are shared by cubin)
  std::string name;
  int num_warps = 4;
  int shared_bytes = 0;
  std::array<unsigned, 3> grid{1, 1, 1};
  std::vector<Arg> args;
  void* function = nullptr;  // CUfunction, loaded on the first replay (guarded by Recipe::load_mutex)
};

struct TensorSpec {
  std::vector<int64_t> sizes;
  at::TensorOptions options;
};

struct Recipe {
  std::vector<TensorSpec> outputs, temps;
  std::vector<Launch> launches;
  std::mutex load_mutex;
};

// The outputs of one call. inputs[i] is the piece's argument at Python position i
// (undefined where that argument is not a tensor).
std::vector<at::Tensor> run(Recipe& recipe, const std::vector<at::Tensor>& inputs);

}  // namespace replay
}  // namespace lora
