// Host-side helpers of the CUDA backend: owners of CUDA objects, the device guard, errors that
// say why no device is usable, and the arena that carves one device allocation.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>

namespace ffnskip::cuda {

// Owners of CUDA objects. Deleters ignore errors: they run in destructors and while unwinding.
struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};
struct HostFree {
  void operator()(void* p) const { cudaFreeHost(p); }
};
struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
struct CublasDestroy {
  void operator()(cublasHandle_t h) const { cublasDestroy(h); }
};
struct GraphDestroy {
  void operator()(cudaGraph_t g) const { cudaGraphDestroy(g); }
};
struct GraphExecDestroy {
  void operator()(cudaGraphExec_t g) const { cudaGraphExecDestroy(g); }
};
using DeviceMemory = std::unique_ptr<char, DeviceFree>;
using PinnedMemory = std::unique_ptr<char, HostFree>;
using Stream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;
using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;
using CublasHandle = std::unique_ptr<std::remove_pointer_t<cublasHandle_t>, CublasDestroy>;
using Graph = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, GraphDestroy>;
using GraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDestroy>;

Stream make_stream();
Event make_event(bool timing = false);
PinnedMemory make_pinned(size_t bytes);

// Makes `device` current for the guard's scope and restores the caller's device afterwards
// (the caller may be a thread of another library that uses another device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

// Throws std::invalid_argument saying why when the process has no usable CUDA device.
void require_device();

std::string cuda_error_text(cudaError_t status);
std::string gigabytes(size_t bytes);
bool env_equals(const char* name, const char* value);

constexpr size_t kArenaAlignment = 256;

// Carves one device allocation into aligned pieces. Run once with no memory to measure, then
// over the allocation to hand out pointers: both runs take the same pieces in the same order.
class Arena {
 public:
  explicit Arena(char* base = nullptr) : base_(base) {}

  template <typename U>
  U* take(size_t count) {
    offset_ = (offset_ + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
    U* p = base_ != nullptr ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(U);
    return p;
  }
  size_t size() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// Bytes of each part of the arena, for the out-of-memory message.
struct ArenaSizes {
  size_t weights = 0;
  size_t kv_cache = 0;
  size_t buffers = 0;
  size_t total() const { return weights + kv_cache + buffers; }
};

// One allocation for everything; when it does not fit, std::invalid_argument saying what
// needed how much, and nothing stays allocated.
DeviceMemory allocate_arena(const ArenaSizes& sizes, const std::string& device_name);

// Device-to-device copy bandwidth of the current device in bytes moved (read + written) per
// second: the median of `iterations` copies of `bytes` bytes.
double copy_bandwidth(size_t bytes, int iterations);

}  // namespace ffnskip::cuda
