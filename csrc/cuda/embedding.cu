#include "embedding.cuh"

#include "common.cuh"
#include "cuda_check.cuh"

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
void launch_embedding(const T* table, const int32_t* tokens, int n, int hidden, float* x,
                      cudaStream_t stream) {
  embedding_kernel<T><<<n, kThreads, 0, stream>>>(table, tokens, hidden, x);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T) \
  template void launch_embedding<T>(const T*, const int32_t*, int, int, float*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
