// Launching recorded Triton kernels from C++ (see ../triton_replay.h). Host code only.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/nvrtc_stub/ATenNVRTC.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda.h>

#include "../checks.h"
#include "../triton_replay.h"

namespace lora {
namespace replay {
namespace {

void check_driver(CUresult result, const char* what, const std::string& kernel) {
  if (result == CUDA_SUCCESS) return;
  const char* message = nullptr;
  at::globalContext().getNVRTC().cuGetErrorString(result, &message);
  TORCH_CHECK(false, "lora: ", what, " failed for Triton kernel ", kernel, ": ",
              message != nullptr ? message : "unknown CUDA driver error");
}

CUfunction load(Launch& launch) {
  const auto& driver = at::globalContext().getNVRTC();
  CUmodule module = nullptr;
  check_driver(driver.cuModuleLoadData(&module, launch.cubin.data()), "cuModuleLoadData", launch.name);
  CUfunction function = nullptr;
  check_driver(driver.cuModuleGetFunction(&function, module, launch.name.c_str()), "cuModuleGetFunction",
               launch.name);
  // Above 48 KiB, dynamic shared memory must be opted into (as Triton's own launcher does).
  if (launch.shared_bytes > 48 * 1024) {
    check_driver(driver.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           launch.shared_bytes),
                 "cuFuncSetAttribute", launch.name);
  }
  return function;
}

}  // namespace

std::vector<at::Tensor> run(Recipe& recipe, const std::vector<at::Tensor>& inputs) {
  TORCH_INTERNAL_ASSERT(!recipe.outputs.empty());
  const c10::cuda::CUDAGuard guard(recipe.outputs.front().options.device());
  std::vector<at::Tensor> outputs, temps;
  outputs.reserve(recipe.outputs.size());
  for (const auto& spec : recipe.outputs) outputs.push_back(at::empty(spec.sizes, spec.options));
  for (const auto& spec : recipe.temps) temps.push_back(at::empty(spec.sizes, spec.options));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto& driver = at::globalContext().getNVRTC();
  for (Launch& launch : recipe.launches) {
    if (launch.grid[0] == 0 || launch.grid[1] == 0 || launch.grid[2] == 0) continue;  // as Triton's launcher
    {
      std::lock_guard<std::mutex> lock(recipe.load_mutex);
      if (launch.function == nullptr) launch.function = load(launch);
    }
    // One 8-byte slot per parameter; the kernel reads 4 or 8 bytes from the start of each
    // (little-endian). Triton kernels end with two scratch pointers (global, profile),
    // unused here (the recording refuses kernels that need scratch): null.
    std::vector<uint64_t> slots(launch.args.size() + 2, 0);
    std::vector<void*> params(slots.size());
    for (size_t i = 0; i < launch.args.size(); ++i) {
      const Arg& arg = launch.args[i];
      void* slot = &slots[i];
      switch (arg.kind) {
        case Arg::Kind::kInput:
          *static_cast<uint64_t*>(slot) = reinterpret_cast<uint64_t>(inputs.at(arg.integer).data_ptr());
          break;
        case Arg::Kind::kOutput:
          *static_cast<uint64_t*>(slot) = reinterpret_cast<uint64_t>(outputs.at(arg.integer).data_ptr());
          break;
        case Arg::Kind::kTemp:
          *static_cast<uint64_t*>(slot) = reinterpret_cast<uint64_t>(temps.at(arg.integer).data_ptr());
          break;
        case Arg::Kind::kInt32:
          *static_cast<int32_t*>(slot) = static_cast<int32_t>(arg.integer);
          break;
        case Arg::Kind::kInt64:
          *static_cast<int64_t*>(slot) = arg.integer;
          break;
        case Arg::Kind::kFloat32:
          *static_cast<float*>(slot) = arg.real;
          break;
      }
      params[i] = slot;
    }
    for (size_t i = launch.args.size(); i < slots.size(); ++i) params[i] = &slots[i];
    check_driver(driver.cuLaunchKernel(static_cast<CUfunction>(launch.function), launch.grid[0], launch.grid[1],
                                       launch.grid[2], 32 * launch.num_warps, 1, 1, launch.shared_bytes, stream,
                                       params.data(), nullptr),
                 "cuLaunchKernel", launch.name);
  }
  return outputs;
}

}  // namespace replay
}  // namespace lora
