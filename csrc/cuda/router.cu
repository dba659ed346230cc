#include "router.cuh"

#include <stdexcept>

#include "../core/skip_rule.h"
#include "common.cuh"
#include "cuda_check.cuh"
#include "ffnskip/policy.h"  // kRouterPromptTokens
#include "norm.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kRouteThreads = 256;

// One block: the inverse RMS of each token's row, then each thread averages its columns of the
// normed rows over the tokens and multiplies them by the router. Rounded products and sums
// (__fmul_rn, __fadd_rn: never fused), as the CPU backend's rms_norm, axpy and division make
// them.
__global__ void __launch_bounds__(kRouteThreads) route_layer_kernel(const RouteArgs a) {
  __shared__ float scratch[kWarpSize];
  __shared__ float inv_rms[kRouterPromptTokens];
  for (int t = 0; t < a.n; ++t) {
    const float value = row_inv_rms(a.x + static_cast<int64_t>(t) * a.hidden, a.hidden, a.eps,
                                    scratch);
    if (threadIdx.x == 0) inv_rms[t] = value;
  }
  __syncthreads();
  float partial = 0.0f;
  for (int j = threadIdx.x; j < a.hidden; j += blockDim.x) {
    float column = 0.0f;
    for (int t = 0; t < a.n; ++t) {
      const float x = a.x[static_cast<int64_t>(t) * a.hidden + j];
      column = __fadd_rn(column, __fmul_rn(a.norm_weight[j], __fmul_rn(x, inv_rms[t])));
    }
    partial += a.weight[j] * (column / static_cast<float>(a.n));
  }
  const float dot = block_sum(partial, scratch);
  if (threadIdx.x == 0) {
    const float logit = dot + *a.bias;
    *a.layer_off = router_keeps_layer(logit, a.threshold_logit) ? 0 : 1;
    *a.gate = 1.0f / (1.0f + expf(-logit));
  }
}

}  // namespace

void launch_route_layer(const RouteArgs& args, cudaStream_t stream) {
  if (args.n < 1 || args.n > kRouterPromptTokens) {
    throw std::invalid_argument("the router averages 1 to kRouterPromptTokens tokens");
  }
  route_layer_kernel<<<1, kRouteThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ffnskip::cuda
