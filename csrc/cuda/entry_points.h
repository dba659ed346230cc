// The boundary between the core and libffnskip_cuda.so: the C entry points the library exports
// and the core's loader (csrc/core/cuda_loader.cpp) looks up with dlsym. Plain C++, no CUDA
// headers, so the core compiles it on machines without the toolkit.
//
// Both sides are built from the same sources by the same compiler in one build, so C++ types
// (ModelConfig, ModelView, Backend) and exceptions cross the boundary. The build passes both
// sides FFNSKIP_CUDA_INTERFACE, a hash of the headers that define them; the loader refuses a
// library reporting another (a stale one from another build, found on the search path).
#pragma once

#include <cstddef>

#include "../core/backend.h"
#include "../core/model_view.h"
#include "ffnskip/config.h"
#include "ffnskip/decoder.h"
#include "kernel_calls.h"

#define FFNSKIP_CUDA_EXPORT __attribute__((visibility("default")))

namespace ffnskip {

// What the library's CUDA runtime reports; filled by ffnskip_cuda_query.
struct CudaRuntimeQuery {
  int runtime_version = 0;  // cudaRuntimeGetVersion: 1000 * major + 10 * minor
  int driver_version = 0;   // cudaDriverGetVersion; 0 without a driver
  int cublas_version = 0;   // 10000 * major + 100 * minor + patch
  int device_count = 0;     // usable devices
  char device_name[256] = {};  // the current device (0 unless the caller chose another)
  char error[512] = {};        // why no device is usable, when device_count is 0
};

}  // namespace ffnskip

extern "C" {

// FFNSKIP_CUDA_INTERFACE of the library's build.
FFNSKIP_CUDA_EXPORT const char* ffnskip_cuda_interface();

FFNSKIP_CUDA_EXPORT void ffnskip_cuda_query(ffnskip::CudaRuntimeQuery* out);

// A backend on the current CUDA device holding the weights in `dtype` (F32, F16 or BF16; Auto:
// the block formats the kernels read in place as stored, everything else in F16).
// Throws std::invalid_argument when no device is usable, the model's shape is not supported or
// the GPU memory does not suffice (nothing stays allocated), std::runtime_error on CUDA errors.
FFNSKIP_CUDA_EXPORT ffnskip::Backend* ffnskip_cuda_create_backend(
    const ffnskip::ModelConfig* config, const ffnskip::ModelView* model, int max_seq_len,
    ffnskip::DType dtype);

// Device-to-device copy bandwidth on the current device, in bytes moved (read + written) per
// second: the median of `iterations` copies of `bytes` bytes. Throws like the factory.
FFNSKIP_CUDA_EXPORT double ffnskip_cuda_copy_bandwidth(size_t bytes, int iterations);

// One kernel on the current device, on copies of the call's host buffers (kernel_calls.h), for
// the per-kernel tests. Throws like the factory.
FFNSKIP_CUDA_EXPORT void ffnskip_cuda_kernel_linear(const ffnskip::CudaLinearCall* call);
FFNSKIP_CUDA_EXPORT void ffnskip_cuda_kernel_dequantize(const ffnskip::CudaDequantizeCall* call);
FFNSKIP_CUDA_EXPORT void ffnskip_cuda_kernel(const ffnskip::CudaKernelCall* call);

}  // extern "C"
