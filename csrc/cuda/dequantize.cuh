// Rows of a GGUF block format read in place (block_formats.cuh) dequantised into a dense type:
// the weight tiles of prefill linears (into T, for cuBLAS, gemm.cuh) and the embedding lookup
// in a quantised table (into the fp32 residual stream, embedding.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ffnskip/weights.h"

namespace ffnskip::cuda {

// out[i, :] = row (row_ids != null ? row_ids[i] : first_row + i) of `blocks` [*, cols], for
// i < n; `type` is a native block format, cols a whole number of its blocks; Out is float,
// __half or __nv_bfloat16. row_ids in device memory.
template <typename Out>
void launch_dequantize_rows(const void* blocks, TensorType type, int cols,
                            const int32_t* row_ids, int64_t first_row, int n, Out* out,
                            cudaStream_t stream);

}  // namespace ffnskip::cuda
