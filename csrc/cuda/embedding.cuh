// Embedding gather: x[t, :] = table[tokens[t], :] widened to fp32 (the residual stream).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffnskip::cuda {

// tokens: n ids in device memory (written by the pass's input copy, so a captured graph reads
// the token of the step being replayed).
template <typename T>
void launch_embedding(const T* table, const int32_t* tokens, int n, int hidden, float* x,
                      cudaStream_t stream);

}  // namespace ffnskip::cuda
