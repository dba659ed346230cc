// Error checking for CUDA runtime and cuBLAS calls: a failed call becomes a std::runtime_error
// naming the call, the place and the library's own message.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ffnskip::cuda {

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                           ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                           ": " + cublasGetStatusName(status) + ": " +
                           cublasGetStatusString(status));
}

}  // namespace ffnskip::cuda

#define CUDA_CHECK(call) ::ffnskip::cuda::check_cuda((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) ::ffnskip::cuda::check_cublas((call), #call, __FILE__, __LINE__)
// After a kernel launch: reports a bad launch configuration (and any earlier asynchronous error).
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
