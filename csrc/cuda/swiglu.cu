#include "swiglu.cuh"

#include <algorithm>

#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void swiglu_kernel(const float* __restrict__ gate_up, int64_t count, int inter,
                              T* __restrict__ act, const int32_t* __restrict__ skip_flag) {
  if (skip_flag != nullptr && *skip_flag != 0) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / inter;
    const int64_t j = i % inter;
    const float* gate = gate_up + t * 2 * inter;
    act[i] = from_float<T>(silu_mul(gate[j], gate[inter + j]));
  }
}

}  // namespace

template <typename T>
void launch_swiglu(const float* gate_up, int n, int inter, T* act, const int32_t* skip_flag,
                   cudaStream_t stream) {
  const int64_t count = static_cast<int64_t>(n) * inter;
  const int blocks = static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 65535));
  swiglu_kernel<T><<<blocks, kThreads, 0, stream>>>(gate_up, count, inter, act, skip_flag);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T) \
  template void launch_swiglu<T>(const float*, int, int, T*, const int32_t*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
