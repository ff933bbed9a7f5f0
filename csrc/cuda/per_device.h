// A host-side answer kept per CUDA device (masked_grad_y.cu, small_m_forward.cu): a driver query
// or attribute set whose result does not change for a kernel on a device, worked out on the first
// launch there and read without a lock afterwards, so the launch path pays one atomic load.
#pragma once
#include <array>
#include <atomic>

namespace lora {

// compute() for `device`, remembered in `cache` (one per question; value + 1, 0 = not yet known).
// compute must be idempotent and return a value >= 0: two threads may both run it the first time.
// Devices past the cache's size are computed on every call.
template <size_t kDevices, typename Compute>
int once_per_device(std::array<std::atomic<int>, kDevices>& cache, int device, Compute&& compute) {
  if (device < 0 || device >= static_cast<int>(kDevices)) return compute();
  const int known = cache[device].load(std::memory_order_acquire);
  if (known != 0) return known - 1;
  const int value = compute();
  cache[device].store(value + 1, std::memory_order_release);
  return value;
}

// The cache size the kernels use: the devices of one node.
constexpr size_t kCachedDevices = 64;
using PerDeviceCache = std::array<std::atomic<int>, kCachedDevices>;

}  // namespace lora
