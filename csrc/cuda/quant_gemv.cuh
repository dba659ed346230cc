// The decode GEMV over weights in a GGUF block format read in place (Q8_0, Q5_0, Q4_K, Q6_K):
// blocks dequantised in registers (block_formats.cuh), activations in T, fp32 accumulation, the
// outputs and the skip flag of launch_gemv (gemv.cuh), which calls it for those formats.
#pragma once

#include <cuda_runtime.h>

#include "gemv.cuh"

namespace ffnskip::cuda {

// args.weight_type is a native block format; args.cols a whole number of its blocks.
template <typename T>
void launch_quant_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream);

}  // namespace ffnskip::cuda
