#include "embedding.cuh"

#include "common.cuh"
#include "cuda_check.cuh"
#include "dequantize.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 256;

// One block per token.
template <typename T>
__global__ void embedding_kernel(const T* __restrict__ table, const int32_t* __restrict__ tokens,
                                 int hidden, float* __restrict__ x) {
  const T* src = table + static_cast<int64_t>(tokens[blockIdx.x]) * hidden;
  float* dst = x + static_cast<int64_t>(blockIdx.x) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = to_float(src[i]);
}

}  // namespace

template <typename T>
void launch_embedding(const void* table, TensorType table_type, const int32_t* tokens, int n,
                      int hidden, float* x, cudaStream_t stream) {
  if (table_type != dense_tensor_type<T>()) {
    launch_dequantize_rows(table, table_type, hidden, tokens, 0, n, x, stream);
    return;
  }
  embedding_kernel<T><<<n, kThreads, 0, stream>>>(static_cast<const T*>(table), tokens, hidden, x);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T)                                                           \
  template void launch_embedding<T>(const void*, TensorType, const int32_t*, int, int, \
                                    float*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
