// Rows of a GGUF block format read in place (block_formats.cuh) dequantised into a dense type:
// the weight tiles of prefill linears (into T, for cuBLAS, gemm.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ffnskip/weights.h"

namespace ffnskip::cuda {

// out[i, :] = row first_row + i of `blocks` [*, cols], for i < n; `type` is a native block
// format, cols a whole number of its blocks; Out is float, __half or __nv_bfloat16.
template <typename Out>
void launch_dequantize_rows(const void* blocks, TensorType type, int cols, int64_t first_row,
                            int n, Out* out, cudaStream_t stream);

}  // namespace ffnskip::cuda
