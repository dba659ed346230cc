#include "gemm.cuh"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common.cuh"
#include "cuda_check.cuh"
#include "dequantize.cuh"
#include "quant_gemv.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kBiasThreads = 256;

template <typename T>
constexpr cudaDataType_t cuda_type();
template <>
constexpr cudaDataType_t cuda_type<float>() {
  return CUDA_R_32F;
}
template <>
constexpr cudaDataType_t cuda_type<__half>() {
  return CUDA_R_16F;
}
template <>
constexpr cudaDataType_t cuda_type<__nv_bfloat16>() {
  return CUDA_R_16BF;
}

// y[t, r] = b[r] (or y[t, r] += b[r]): the bias goes in first, then the GEMM adds onto it.
__global__ void bias_rows_kernel(const float* __restrict__ bias, int rows, int n, float* y,
                                 int y_stride, bool accumulate) {
  const int64_t count = static_cast<int64_t>(n) * rows;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / rows;
    const int r = static_cast<int>(i % rows);
    float& out = y[t * y_stride + r];
    out = accumulate ? out + bias[r] : bias[r];
  }
}

// Each tile of rows [r0, r0 + tile_rows) dequantised into the scratch, then its dense GEMM (the
// same stream orders the reuse of the scratch).
template <typename T>
void gemm_dequantized(cublasHandle_t handle, cudaStream_t stream, const GemmArgs<T>& a) {
  if (a.scratch == nullptr || a.scratch_elements < a.cols) {
    throw std::invalid_argument("GEMM of block-quantised weights without a tile scratch");
  }
  const int tile_rows = static_cast<int>(std::min<int64_t>(a.rows, a.scratch_elements / a.cols));
  for (int r0 = 0; r0 < a.rows; r0 += tile_rows) {
    GemmArgs<T> tile = a;
    tile.rows = std::min(tile_rows, a.rows - r0);
    launch_dequantize_rows(a.weight, a.weight_type, a.cols, r0, tile.rows, a.scratch,
                           stream);
    tile.weight = a.scratch;
    tile.weight_type = dense_tensor_type<T>();
    tile.bias = a.bias != nullptr ? a.bias + r0 : nullptr;
    tile.y = a.y + r0;
    gemm(handle, stream, tile);
  }
}

}  // namespace

template <typename T>
int64_t gemm_scratch_elements(TensorType type, int64_t rows, int cols, int64_t max_tile_elements) {
  const int64_t tile_rows = std::min(rows, std::max<int64_t>(1, max_tile_elements / cols));
  const auto activations = static_cast<int64_t>(
      (quant_gemv_tokens_scratch_bytes(type, cols) + sizeof(T) - 1) / sizeof(T));
  return std::max(tile_rows * cols, activations);
}

template <typename T>
void gemm(cublasHandle_t handle, cudaStream_t stream, const GemmArgs<T>& a) {
  if (a.weight_type != dense_tensor_type<T>()) {
    if (a.n <= kBlockGemvMaxTokens) {
      launch_quant_gemv_tokens(a, stream);
    } else {
      gemm_dequantized(handle, stream, a);
    }
    return;
  }
  if (a.bias != nullptr) {
    const int64_t count = static_cast<int64_t>(a.n) * a.rows;
    const int blocks = static_cast<int>((count + kBiasThreads - 1) / kBiasThreads);
    bias_rows_kernel<<<blocks < 65535 ? blocks : 65535, kBiasThreads, 0, stream>>>(
        a.bias, a.rows, a.n, a.y, a.y_stride, a.accumulate);
    CUDA_CHECK_LAUNCH();
  }
  // Column-major view: Y^T [rows, n] = W [rows, cols] (the row-major W read transposed, lda =
  // cols) times X^T [cols, n] (ldb = cols); Y^T has leading dimension y_stride.
  const float alpha = 1.0f;
  const float beta = a.accumulate || a.bias != nullptr ? 1.0f : 0.0f;
  CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, a.rows, a.n, a.cols, &alpha,
                            a.weight, cuda_type<T>(), a.cols, a.x, cuda_type<T>(), a.cols, &beta,
                            a.y, CUDA_R_32F, a.y_stride, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

#define FFNSKIP_INSTANTIATE(T)                                                  \
  template void gemm<T>(cublasHandle_t, cudaStream_t, const GemmArgs<T>&); \
  template int64_t gemm_scratch_elements<T>(TensorType, int64_t, int, int64_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
