// Linears over many tokens (prefill) with cuBLAS: y[t, :] = x[t, :] W^T + b, W [rows, cols] and
// x in T, y in fp32, fp32 compute (cublasGemmEx, CUBLAS_COMPUTE_32F).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace ffnskip::cuda {

template <typename T>
struct GemmArgs {
  const T* weight = nullptr;    // [rows, cols] row-major
  const float* bias = nullptr;  // [rows] or null
  int rows = 0;
  int cols = 0;
  const T* x = nullptr;  // [n, cols] row-major
  int n = 0;
  float* y = nullptr;  // [n, y_stride] row-major, the first `rows` columns written
  int y_stride = 0;
  bool accumulate = false;  // y += ... instead of y = ...
};

// Runs on the stream the handle is bound to.
template <typename T>
void gemm(cublasHandle_t handle, cudaStream_t stream, const GemmArgs<T>& args);

}  // namespace ffnskip::cuda
