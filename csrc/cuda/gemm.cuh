// Linears over many tokens (prefill) with cuBLAS: y[t, :] = x[t, :] W^T + b, W [rows, cols] and
// x in T, y in fp32, fp32 compute (cublasGemmEx, CUBLAS_COMPUTE_32F). Weights in a native block
// format are dequantised to T a tile of rows at a time (dequantize.cuh), one cuBLAS call per tile.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace ffnskip::cuda {

template <typename T>
struct GemmArgs {
  const void* weight = nullptr;  // [rows, cols] row-major in weight_type: T or a block format
  TensorType weight_type = dense_tensor_type<T>();
  const float* bias = nullptr;   // [rows] or null
  int rows = 0;
  int cols = 0;
  const T* x = nullptr;  // [n, cols] row-major
  int n = 0;
  float* y = nullptr;  // [n, y_stride] row-major, the first `rows` columns written
  int y_stride = 0;
  bool accumulate = false;  // y += ... instead of y = ...
  // Block formats: room for the dequantised tiles, at least one row (cols elements).
  T* scratch = nullptr;
  int64_t scratch_elements = 0;
};

// Runs on the stream the handle is bound to.
template <typename T>
void gemm(cublasHandle_t handle, cudaStream_t stream, const GemmArgs<T>& args);

}  // namespace ffnskip::cuda
