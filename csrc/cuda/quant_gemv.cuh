// The decode GEMV over weights in a GGUF block format read in place (Q8_0, Q5_0, Q4_K, Q6_K), as
// llama.cpp's and the CPU backend's: each thread block first quantises the input (in T, or the
// RMSNorm it opens with) to int8 blocks in shared memory, as the CPU backend does, then warps
// multiply the weights' integers with them by dp4a (block_formats.cuh's dot()), fp32 across
// blocks; the outputs and the skip flag of launch_gemv (gemv.cuh), which calls it for those
// formats. Per value it runs a fraction of the instructions of dequantising to fp32, which
// left the block GEMVs compute-bound (H200: Q4_K at 17% of the copy bandwidth, fp16 at 58%).
#pragma once

#include <cuda_runtime.h>

#include "gemv.cuh"

namespace ffnskip::cuda {

// args.weight_type is a native block format; args.cols a whole number of its blocks.
template <typename T>
void launch_quant_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream);

}  // namespace ffnskip::cuda
