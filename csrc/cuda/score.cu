#include "score.cuh"

#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 1024;

__global__ void __launch_bounds__(kThreads)
    residual_add_score_kernel(float* __restrict__ x, const float* __restrict__ ffn_out,
                              int hidden, SkipState* state, const int32_t* skip_flag,
                              float* score_out) {
  if (skip_flag != nullptr && *skip_flag != 0) return;
  __shared__ float scratch[kWarpSize];
  float ab = 0.0f, aa = 0.0f, bb = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float a = x[i];
    const float b = a + ffn_out[i];
    x[i] = b;
    ab += a * b;
    aa += a * a;
    bb += b * b;
  }
  ab = block_sum(ab, scratch);
  aa = block_sum(aa, scratch);
  bb = block_sum(bb, scratch);
  if (threadIdx.x == 0) {
    record_score(*state, cosine_from_sums(ab, aa, bb));
    *score_out = state->prev_score;
  }
}

__global__ void __launch_bounds__(kThreads)
    cosine_kernel(const float* __restrict__ a, const float* __restrict__ b, int hidden,
                  const int32_t* skip_flag, float* out) {
  if (skip_flag != nullptr && *skip_flag != 0) {
    if (threadIdx.x == 0) *out = quiet_nan();
    return;
  }
  __shared__ float scratch[kWarpSize];
  float ab = 0.0f, aa = 0.0f, bb = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  ab = block_sum(ab, scratch);
  aa = block_sum(aa, scratch);
  bb = block_sum(bb, scratch);
  if (threadIdx.x == 0) *out = cosine_from_sums(ab, aa, bb);
}

}  // namespace

void launch_residual_add_score(float* x, const float* ffn_out, int hidden, SkipState* state,
                               const int32_t* skip_flag, float* score_out, cudaStream_t stream) {
  residual_add_score_kernel<<<1, kThreads, 0, stream>>>(x, ffn_out, hidden, state, skip_flag,
                                                        score_out);
  CUDA_CHECK_LAUNCH();
}

void launch_cosine(const float* a, const float* b, int hidden, const int32_t* skip_flag,
                   float* out, cudaStream_t stream) {
  cosine_kernel<<<1, kThreads, 0, stream>>>(a, b, hidden, skip_flag, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ffnskip::cuda
