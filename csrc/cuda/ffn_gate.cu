#include "ffn_gate.cuh"

#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

__global__ void begin_token_kernel(const SkipRule rule, SkipState* state) {
  begin_token(rule, *state);
}

__global__ void end_token_kernel(SkipState* state) { end_token(*state); }

}  // namespace

void launch_begin_token(const SkipRule& rule, SkipState* state, cudaStream_t stream) {
  begin_token_kernel<<<1, 1, 0, stream>>>(rule, state);
  CUDA_CHECK_LAUNCH();
}

void launch_end_token(SkipState* state, cudaStream_t stream) {
  end_token_kernel<<<1, 1, 0, stream>>>(state);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ffnskip::cuda
