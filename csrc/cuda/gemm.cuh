// Linears over many tokens (prefill) with cuBLAS: y[t, :] = x[t, :] W^T + b, W [rows, cols] and
// x in T, y in fp32, fp32 compute (cublasGemmEx, CUBLAS_COMPUTE_32F). Weights in a native block
// format are dequantised to T a tile of rows at a time (dequantize.cuh), one cuBLAS call per
// tile, except for up to kBlockGemvMaxTokens tokens, which run the block GEMV on int8
// activations (quant_gemv.cuh), as the decode step does.
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
  // Block formats: room for the dequantised tiles, at least one row (cols elements), and for
  // the int8 activations of a few tokens (gemm_scratch_elements).
  T* scratch = nullptr;
  int64_t scratch_elements = 0;
};

// The backend's prefill dequantises block-format weights a tile of rows at a time, into at
// most this many elements of T (16 MiB in fp16) beside the weights.
constexpr int64_t kGemmTileElements = int64_t{8} << 20;

// The scratch (elements of T) a GEMM over a [rows, cols] matrix in native block format `type`
// needs, for tiles of at most max_tile_elements dequantised weights (at least a row).
template <typename T>
int64_t gemm_scratch_elements(TensorType type, int64_t rows, int cols, int64_t max_tile_elements);

// Runs on the stream the handle is bound to.
template <typename T>
void gemm(cublasHandle_t handle, cudaStream_t stream, const GemmArgs<T>& args);

}  // namespace ffnskip::cuda
