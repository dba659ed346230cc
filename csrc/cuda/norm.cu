#include "norm.cuh"

#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

template <typename T>
__global__ void __launch_bounds__(kRmsNormThreads)
    rmsnorm_kernel(const float* x, int dim, const float* weight, float eps, T* out) {
  __shared__ float scratch[kWarpSize];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * dim;
  rmsnorm_row(x + offset, dim, weight, eps, out + offset, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kRmsNormThreads)
    gated_rmsnorm_kernel(const float* x, int dim, const float* weight, float eps, T* out,
                         const FfnGate gate) {
  __shared__ float scratch[kWarpSize];
  __shared__ bool skip;
  if (threadIdx.x == 0) skip = decide_ffn(gate);
  __syncthreads();
  if (skip) return;
  rmsnorm_row(x, dim, weight, eps, out, scratch);
}

}  // namespace

template <typename T>
void launch_rmsnorm(const float* x, int n, int dim, const float* weight, float eps, T* out,
                    cudaStream_t stream) {
  rmsnorm_kernel<T><<<n, kRmsNormThreads, 0, stream>>>(x, dim, weight, eps, out);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_gated_rmsnorm(const float* x, int dim, const float* weight, float eps, T* out,
                          const FfnGate& gate, cudaStream_t stream) {
  gated_rmsnorm_kernel<T><<<1, kRmsNormThreads, 0, stream>>>(x, dim, weight, eps, out, gate);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T)                                                                 \
  template void launch_rmsnorm<T>(const float*, int, int, const float*, float, T*, cudaStream_t); \
  template void launch_gated_rmsnorm<T>(const float*, int, const float*, float, T*,            \
                                        const FfnGate&, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
