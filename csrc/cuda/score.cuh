// Cosine reductions over the hidden dimension (fp32, one block: a decode step has one token):
// the FFN-SkipLLM saturation score cos(a_l, x_{l+1}), fused with the FFN's residual add, and
// the layer score cos(x_l, x_{l+1}).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/skip_rule.h"

namespace ffnskip::cuda {

// a = x; x += ffn_out; score = cos(a, x); record_score(*state, score); *score_out is then
// state->prev_score (the clamped score, as the CPU backend records it). Does nothing when
// skip_flag is non-null and set.
void launch_residual_add_score(float* x, const float* ffn_out, int hidden, SkipState* state,
                               const int32_t* skip_flag, float* score_out, cudaStream_t stream);

// *out = cos(a, b) (cosine_from_sums of the fp32 sums); NaN when skip_flag is non-null and set
// (the layer did not run).
void launch_cosine(const float* a, const float* b, int hidden, const int32_t* skip_flag,
                   float* out, cudaStream_t stream);

}  // namespace ffnskip::cuda
