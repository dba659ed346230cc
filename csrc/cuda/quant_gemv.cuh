// The decode GEMV over weights in a GGUF block format read in place (Q8_0, Q5_0, Q4_K, Q6_K), as
// llama.cpp's and the CPU backend's: each thread block first quantises the input (in T, or the
// RMSNorm it opens with) to int8 blocks in shared memory, as the CPU backend does, then warps
// multiply the weights' integers with them by dp4a (block_formats.cuh's dot()), fp32 across
// blocks; the outputs and the skip flag of launch_gemv (gemv.cuh), which calls it for those
// formats. Per value it runs a fraction of the instructions of dequantising to fp32, which
// left the block GEMVs compute-bound (H200: Q4_K at 17% of the copy bandwidth, fp16 at 58%).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "gemm.cuh"
#include "gemv.cuh"

namespace ffnskip::cuda {

// args.weight_type is a native block format; args.cols a whole number of its blocks.
template <typename T>
void launch_quant_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream);

// Tokens up to which a linear over blocks runs as the block GEMV of each token (a speculative
// verification, a short prompt): one read of the weights, where the dequantised tiles and
// cuBLAS write and read the whole matrix in T again whatever the number of tokens.
constexpr int kBlockGemvMaxTokens = 8;

// y[t, :] (+)= x[t, :] W^T + b for t < args.n <= kBlockGemvMaxTokens, by the block GEMV on each
// token's int8 activations, which a first kernel writes to args.scratch; throws
// std::invalid_argument when the scratch holds less than quant_gemv_tokens_scratch_bytes.
template <typename T>
void launch_quant_gemv_tokens(const GemmArgs<T>& args, cudaStream_t stream);

// The scratch launch_quant_gemv_tokens needs for kBlockGemvMaxTokens rows of `cols` values
// against weights of native block format `type`.
size_t quant_gemv_tokens_scratch_bytes(TensorType type, int cols);

}  // namespace ffnskip::cuda
