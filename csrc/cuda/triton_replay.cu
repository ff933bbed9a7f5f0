// Launching recorded Triton kernels from C++ (see ../triton_replay.h). Host code only.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda.h>
#include <dlfcn.h>

#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "../checks.h"
#include "../triton_replay.h"

namespace lora {
namespace replay {
namespace {

// The few driver API functions the replay needs, looked up in the driver library that the
// CUDA runtime has already loaded into the process. _C.so does not link libcuda (the torch
// wheels do not ship ATen's driver stub header), so importing lora_ext never needs a driver.
struct Driver {
  decltype(&cuGetErrorString) get_error_string = nullptr;
  decltype(&cuCtxGetCurrent) ctx_get_current = nullptr;
  decltype(&cuModuleLoadData) module_load_data = nullptr;
  decltype(&cuModuleGetFunction) module_get_function = nullptr;
  decltype(&cuFuncSetAttribute) func_set_attribute = nullptr;
  decltype(&cuLaunchKernel) launch_kernel = nullptr;
  decltype(&cuTensorMapEncodeTiled) tensor_map_encode_tiled = nullptr;
};

const Driver& driver() {
  static const Driver table = [] {
    Driver d;
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    const char* error = library == nullptr ? dlerror() : nullptr;
    TORCH_CHECK(library != nullptr, "lora: cannot open the CUDA driver library libcuda.so.1 (",
                error != nullptr ? error : "no message", ")");
    auto find = [library](auto& function, const char* name) {
      function = reinterpret_cast<std::remove_reference_t<decltype(function)>>(dlsym(library, name));
      TORCH_CHECK(function != nullptr, "lora: the CUDA driver has no ", name);
    };
    find(d.get_error_string, "cuGetErrorString");
    find(d.ctx_get_current, "cuCtxGetCurrent");
    find(d.module_load_data, "cuModuleLoadData");
    find(d.module_get_function, "cuModuleGetFunction");
    find(d.func_set_attribute, "cuFuncSetAttribute");
    find(d.launch_kernel, "cuLaunchKernel");
    find(d.tensor_map_encode_tiled, "cuTensorMapEncodeTiled");
    return d;
  }();
  return table;
}

void check_driver(CUresult result, const char* what, const std::string& kernel) {
  if (result == CUDA_SUCCESS) return;
  const char* message = nullptr;
  driver().get_error_string(result, &message);
  TORCH_CHECK(false, "lora: ", what, " failed for Triton kernel ", kernel, ": ",
              message != nullptr ? message : "unknown CUDA driver error");
}

CUfunction load(const Launch& launch) {
  CUmodule module = nullptr;
  check_driver(driver().module_load_data(&module, launch.cubin.data()), "cuModuleLoadData", launch.name);
  CUfunction function = nullptr;
  check_driver(driver().module_get_function(&function, module, launch.name.c_str()), "cuModuleGetFunction",
               launch.name);
  // Above 48 KiB, dynamic shared memory must be opted into (as Triton's own launcher does).
  if (launch.shared_bytes > 48 * 1024) {
    check_driver(driver().func_set_attribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           launch.shared_bytes),
                 "cuFuncSetAttribute", launch.name);
  }
  return function;
}

// The loaded function of `launch` on `device`, shared by every recipe that launches the same
// cubin there: recipes differ by shapes (a new token count is a new key), the compiled
// variants are few, so each is loaded once per device, not once per recipe.
CUfunction load_shared(const Launch& launch, c10::DeviceIndex device) {
  static std::mutex mutex;
  static auto* loaded = new std::unordered_map<std::string, CUfunction>();  // never destroyed (exit order)
  std::string key = std::to_string(device) + '|' + launch.name + '|' + launch.cubin;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = loaded->find(key);
  if (found != loaded->end()) return found->second;
  CUfunction function = load(launch);
  loaded->emplace(std::move(key), function);
  return function;
}

// The map Triton's launcher would pass for `spec` over `address` (its fill_tma_descriptor:
// tiled, element strides 1, no interleave, L2 promotion 128 B). The driver checks address
// alignment and sizes; the recording only records maps it encoded itself for the same key.
void encode_tensor_map(CUtensorMap* map, const TensorMapSpec& spec, void* address, const std::string& kernel) {
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  check_driver(driver().tensor_map_encode_tiled(
                   map, static_cast<CUtensorMapDataType>(spec.data_type), static_cast<cuuint32_t>(spec.dims.size()),
                   address, spec.dims.data(), spec.byte_strides.data(), spec.box.data(), element_strides,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, static_cast<CUtensorMapSwizzle>(spec.swizzle),
                   CU_TENSOR_MAP_L2_PROMOTION_L2_128B, static_cast<CUtensorMapFloatOOBfill>(spec.fill)),
               "cuTensorMapEncodeTiled", kernel);
}

}  // namespace

std::vector<at::Tensor> run(Recipe& recipe, const std::vector<at::Tensor>& inputs) {
  TORCH_INTERNAL_ASSERT(!recipe.outputs.empty());
  const c10::Device device = recipe.outputs.front().options.device();
  const c10::cuda::CUDAGuard guard(device);
  // The driver calls below need a current context. A thread whose first CUDA work on this device is
  // a replay may have none: the guard does not set a device that is already the runtime's current
  // one, and cached allocations call no runtime function. cudaSetDevice makes the device's primary
  // context current (CUDA >= 12), as the runtime's own first call in the thread would.
  CUcontext current = nullptr;
  check_driver(driver().ctx_get_current(&current), "cuCtxGetCurrent", "(replay)");
  if (current == nullptr) C10_CUDA_CHECK(cudaSetDevice(device.index()));
  std::vector<at::Tensor> outputs, temps;
  outputs.reserve(recipe.outputs.size());
  for (const auto& spec : recipe.outputs) outputs.push_back(at::empty(spec.sizes, spec.options));
  for (const auto& spec : recipe.temps) temps.push_back(at::empty(spec.sizes, spec.options));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (Launch& launch : recipe.launches) {
    if (launch.grid[0] == 0 || launch.grid[1] == 0 || launch.grid[2] == 0) continue;  // as Triton's launcher
    {
      std::lock_guard<std::mutex> lock(recipe.load_mutex);
      if (launch.function == nullptr) {
        launch.function = load_shared(launch, device.index());
        std::string().swap(launch.cubin);  // the loaded function is all this recipe needs from now on
      }
    }
    // One 8-byte slot per scalar parameter; the kernel reads 4 or 8 bytes from the start of
    // each (little-endian); a tensor map is a 128-byte parameter of its own. Triton kernels end
    // with two scratch pointers (global, profile), unused here (the recording refuses kernels
    // that need scratch): null.
    std::vector<uint64_t> slots(launch.args.size() + 2, 0);
    std::vector<CUtensorMap> maps(launch.tensor_maps);
    std::vector<void*> params(slots.size());
    auto address_of = [&](Arg::Kind kind, int64_t index) -> void* {
      switch (kind) {
        case Arg::Kind::kInput: return inputs.at(index).data_ptr();
        case Arg::Kind::kOutput: return outputs.at(index).data_ptr();
        case Arg::Kind::kTemp: return temps.at(index).data_ptr();
        default: break;
      }
      TORCH_INTERNAL_ASSERT(false, "lora: a replayed tensor is an input, an output or a temporary");
      return nullptr;
    };
    size_t next_map = 0;
    for (size_t i = 0; i < launch.args.size(); ++i) {
      const Arg& arg = launch.args[i];
      void* slot = &slots[i];
      switch (arg.kind) {
        case Arg::Kind::kInput:
        case Arg::Kind::kOutput:
        case Arg::Kind::kTemp:
          *static_cast<uint64_t*>(slot) = reinterpret_cast<uint64_t>(address_of(arg.kind, arg.integer));
          break;
        case Arg::Kind::kTensorMap:
          slot = &maps.at(next_map++);
          encode_tensor_map(static_cast<CUtensorMap*>(slot), arg.map, address_of(arg.base, arg.integer), launch.name);
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
    check_driver(driver().launch_kernel(static_cast<CUfunction>(launch.function), launch.grid[0], launch.grid[1],
                                       launch.grid[2], 32 * launch.num_warps, 1, 1, launch.shared_bytes, stream,
                                       params.data(), nullptr),
                 "cuLaunchKernel", launch.name);
  }
  return outputs;
}

}  // namespace replay
}  // namespace lora
