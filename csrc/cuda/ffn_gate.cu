#include "ffn_gate.cuh"

#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

__global__ void begin_token_kernel(const SkipRule rule, SkipState* state,
                                   const int32_t* decode_index) {
  begin_token(rule, *state, *decode_index);
}

}  // namespace

void launch_begin_token(const SkipRule& rule, SkipState* state, const int32_t* decode_index,
                        cudaStream_t stream) {
  begin_token_kernel<<<1, 1, 0, stream>>>(rule, state, decode_index);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ffnskip::cuda
