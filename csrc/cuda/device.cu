#include "device.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cuda_check.cuh"

namespace ffnskip::cuda {

Stream make_stream() {
  cudaStream_t s = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return Stream(s);
}

Event make_event(bool timing) {
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  return Event(e);
}

PinnedMemory make_pinned(size_t bytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaMallocHost(&p, bytes));
  return PinnedMemory(static_cast<char*>(p));
}

DeviceGuard::DeviceGuard(int device) : device_(device) {
  CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device_) CUDA_CHECK(cudaSetDevice(device_));
}

DeviceGuard::~DeviceGuard() {
  if (previous_ != device_) cudaSetDevice(previous_);
}

std::string cuda_error_text(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}

void require_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    throw std::invalid_argument(
        "device='cuda' is not available: no usable CUDA device (cudaGetDeviceCount: " +
        cuda_error_text(status) + "; is an NVIDIA driver installed and a GPU visible?)");
  }
  if (count == 0) {
    throw std::invalid_argument("device='cuda' is not available: no CUDA device is visible");
  }
}

std::string gigabytes(size_t bytes) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.2f GB (%zu bytes)", static_cast<double>(bytes) / 1e9,
                bytes);
  return text;
}

bool env_equals(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

DeviceMemory allocate_arena(const ArenaSizes& sizes, const std::string& device_name) {
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  void* p = nullptr;
  const size_t bytes = sizes.total();
  const cudaError_t status =
      bytes <= free_bytes ? cudaMalloc(&p, bytes) : cudaErrorMemoryAllocation;
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it
    throw std::invalid_argument(
        "out of GPU memory on " + device_name + ": the model needs " + gigabytes(bytes) +
        " (weights " + gigabytes(sizes.weights) + ", KV cache " + gigabytes(sizes.kv_cache) +
        ", buffers " + gigabytes(sizes.buffers) + "), but only " + gigabytes(free_bytes) +
        " of " + gigabytes(total_bytes) + " are free; nothing was kept allocated "
        "(a smaller max_seq_len shrinks the KV cache)");
  }
  CUDA_CHECK(status);
  return DeviceMemory(static_cast<char*>(p));
}

double copy_bandwidth(size_t bytes, int iterations) {
  void* src = nullptr;
  void* dst = nullptr;
  CUDA_CHECK(cudaMalloc(&src, bytes));
  DeviceMemory src_owner(static_cast<char*>(src));
  CUDA_CHECK(cudaMalloc(&dst, bytes));
  DeviceMemory dst_owner(static_cast<char*>(dst));
  Stream stream = make_stream();
  CUDA_CHECK(cudaMemsetAsync(src, 1, bytes, stream.get()));
  Event start = make_event(true);
  Event stop = make_event(true);
  std::vector<float> ms;
  for (int i = -1; i < std::max(1, iterations); ++i) {  // i = -1: warm-up
    CUDA_CHECK(cudaEventRecord(start.get(), stream.get()));
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream.get()));
    CUDA_CHECK(cudaEventRecord(stop.get(), stream.get()));
    CUDA_CHECK(cudaEventSynchronize(stop.get()));
    float elapsed = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&elapsed, start.get(), stop.get()));
    if (i >= 0) ms.push_back(elapsed);
  }
  std::sort(ms.begin(), ms.end());
  return 2.0 * static_cast<double>(bytes) / (ms[ms.size() / 2] * 1e-3);
}

}  // namespace ffnskip::cuda
