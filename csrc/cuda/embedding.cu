#include "embedding.cuh"

#include <type_traits>

#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 256;

template <typename Source>
struct IsBlockFormat : std::false_type {};
template <TensorType type>
struct IsBlockFormat<BlockFormat<type>> : std::true_type {};

// One block per token. Source: the table's element type T, or its BlockFormat.
template <typename Source>
__global__ void __launch_bounds__(kThreads)
    embedding_kernel(const void* __restrict__ table, const int32_t* __restrict__ tokens,
                     int hidden, float* __restrict__ x, const TokenStart start) {
  start_token(start);
  const int64_t row = tokens[blockIdx.x];
  float* dst = x + static_cast<int64_t>(blockIdx.x) * hidden;
  if constexpr (IsBlockFormat<Source>::value) {
    const auto* src = static_cast<const uint8_t*>(table) + row * format_row_bytes<Source>(hidden);
    dequantize_row<Source>(src, hidden, dst, threadIdx.x, kThreads);
  } else {
    const Source* src = static_cast<const Source*>(table) + row * hidden;
    for (int i = threadIdx.x; i < hidden; i += kThreads) dst[i] = to_float(src[i]);
  }
}

}  // namespace

template <typename T>
void launch_embedding(const void* table, TensorType table_type, const int32_t* tokens, int n,
                      int hidden, float* x, const TokenStart& start, cudaStream_t stream) {
  if (n <= 0) return;
  if (table_type == dense_tensor_type<T>()) {
    embedding_kernel<T><<<n, kThreads, 0, stream>>>(table, tokens, hidden, x, start);
    CUDA_CHECK_LAUNCH();
    return;
  }
  visit_block_format(table_type, [&](auto format) {
    embedding_kernel<decltype(format)><<<n, kThreads, 0, stream>>>(table, tokens, hidden, x,
                                                                   start);
    CUDA_CHECK_LAUNCH();
  });
}

#define FFNSKIP_INSTANTIATE(T)                                                          \
  template void launch_embedding<T>(const void*, TensorType, const int32_t*, int, int, \
                                    float*, const TokenStart&, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
