// The logits head: final RMSNorm of the last token's residual row, then the vocabulary GEMV
// (fp32 logits; the LM head is the embedding table when the model ties them). One launch: the
// norm runs in the GEMV's prologue, unless the row is wider than it stages (gemv_folds_norm).
#pragma once

#include <cuda_runtime.h>

#include "ffnskip/weights.h"

namespace ffnskip::cuda {

// x_row [hidden] fp32; lm_head [vocab, hidden] in lm_head_type (T or a native block format);
// normed [hidden] scratch in the storage type (for a row too wide to fold); logits [vocab] fp32.
template <typename T>
void launch_logits_head(const float* x_row, int hidden, const float* final_norm, float eps,
                        const void* lm_head, TensorType lm_head_type, int vocab, T* normed,
                        float* logits, cudaStream_t stream);

}  // namespace ffnskip::cuda
