// Embedding gather: x[t, :] = table[tokens[t], :] widened to fp32 (the residual stream); the
// table in T or in a native block format (dequantised row by row). A decode step's lookup also
// starts the skip rule's token (ffn_gate.cuh TokenStart): the step's first kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ffn_gate.cuh"
#include "ffnskip/weights.h"

namespace ffnskip::cuda {

// tokens: n ids in device memory (written by the pass's input copy, so a captured graph reads
// the token of the step being replayed). table_type: dense_tensor_type<T>() or a block format.
template <typename T>
void launch_embedding(const void* table, TensorType table_type, const int32_t* tokens, int n,
                      int hidden, float* x, const TokenStart& start, cudaStream_t stream);

}  // namespace ffnskip::cuda
