// The C entry points of libffnskip_cuda.so (entry_points.h), looked up by the core's loader.
#include "entry_points.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <stdexcept>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "device.cuh"
#include "kernel_calls.cuh"

extern "C" {

const char* ffnskip_cuda_interface() { return FFNSKIP_CUDA_INTERFACE; }

void ffnskip_cuda_query(ffnskip::CudaRuntimeQuery* out) {
  *out = ffnskip::CudaRuntimeQuery{};
  cudaRuntimeGetVersion(&out->runtime_version);
  cudaDriverGetVersion(&out->driver_version);
  int major = 0, minor = 0, patch = 0;
  if (cublasGetProperty(MAJOR_VERSION, &major) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(MINOR_VERSION, &minor) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(PATCH_LEVEL, &patch) == CUBLAS_STATUS_SUCCESS) {
    out->cublas_version = major * 10000 + minor * 100 + patch;
  }
  try {
    ffnskip::cuda::require_device();
    int device = 0;
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    CUDA_CHECK(cudaGetDeviceCount(&out->device_count));
    std::snprintf(out->device_name, sizeof(out->device_name), "%s", prop.name);
  } catch (const std::exception& e) {
    out->device_count = 0;
    std::snprintf(out->error, sizeof(out->error), "%s", e.what());
  }
}

ffnskip::Backend* ffnskip_cuda_create_backend(const ffnskip::ModelConfig* config,
                                              const ffnskip::ModelView* model, int max_seq_len,
                                              ffnskip::DType dtype) {
  using namespace ffnskip::cuda;
  require_device();
  switch (dtype) {
    case ffnskip::DType::F32:
      return new_cuda_backend<float>(*config, *model, max_seq_len, dtype);
    case ffnskip::DType::Auto:  // block formats the kernels read in place, everything else fp16
    case ffnskip::DType::F16:
      return new_cuda_backend<__half>(*config, *model, max_seq_len, dtype);
    case ffnskip::DType::BF16:
      return new_cuda_backend<__nv_bfloat16>(*config, *model, max_seq_len, dtype);
  }
  throw std::invalid_argument("unknown dtype");
}

double ffnskip_cuda_copy_bandwidth(size_t bytes, int iterations) {
  ffnskip::cuda::require_device();
  return ffnskip::cuda::copy_bandwidth(bytes, iterations);
}

void ffnskip_cuda_kernel_linear(const ffnskip::CudaLinearCall* call) {
  ffnskip::cuda::require_device();
  ffnskip::cuda::run_linear(*call);
}

void ffnskip_cuda_kernel_dequantize(const ffnskip::CudaDequantizeCall* call) {
  ffnskip::cuda::require_device();
  ffnskip::cuda::run_dequantize(*call);
}

void ffnskip_cuda_kernel(const ffnskip::CudaKernelCall* call) {
  ffnskip::cuda::require_device();
  ffnskip::cuda::run_kernel(*call);
}

}  // extern "C"
