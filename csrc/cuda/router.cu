#include "router.cuh"

#include "common.cuh"
#include "cuda_check.cuh"
#include "../core/skip_rule.h"

namespace ffnskip::cuda {

namespace {

constexpr int kRouteThreads = 256;
constexpr int kAddThreads = 256;

// One block: each thread averages its columns over the tokens and multiplies by the router.
template <typename T>
__global__ void __launch_bounds__(kRouteThreads) route_layer_kernel(const RouteArgs<T> a) {
  __shared__ float scratch[kWarpSize];
  const float inv_n = 1.0f / static_cast<float>(a.n);
  float partial = 0.0f;
  for (int j = threadIdx.x; j < a.hidden; j += blockDim.x) {
    float column = 0.0f;
    for (int t = 0; t < a.n; ++t) column += to_float(a.xn[static_cast<int64_t>(t) * a.hidden + j]);
    partial += a.weight[j] * (column * inv_n);
  }
  const float dot = block_sum(partial, scratch);
  if (threadIdx.x == 0) {
    const float logit = dot + *a.bias;
    *a.layer_off = router_keeps_layer(logit, a.threshold_logit) ? 0 : 1;
    *a.gate = 1.0f / (1.0f + expf(-logit));
  }
}

__global__ void gated_residual_add_kernel(float* __restrict__ x, const float* __restrict__ delta,
                                          int64_t count, const int32_t* skip_flag) {
  if (*skip_flag != 0) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) x[i] += delta[i];
}

}  // namespace

template <typename T>
void launch_route_layer(const RouteArgs<T>& args, cudaStream_t stream) {
  route_layer_kernel<T><<<1, kRouteThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
}

void launch_gated_residual_add(float* x, const float* delta, int64_t count,
                               const int32_t* skip_flag, cudaStream_t stream) {
  const int blocks = static_cast<int>((count + kAddThreads - 1) / kAddThreads);
  gated_residual_add_kernel<<<blocks, kAddThreads, 0, stream>>>(x, delta, count, skip_flag);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T) \
  template void launch_route_layer<T>(const RouteArgs<T>&, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
