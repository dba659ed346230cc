// Decode linears, one token: y = W x (+ b), W [rows, cols] stored in T (fp32, fp16 or bf16) or in
// a GGUF block format read in place (Q8_0, Q5_0, Q4_K, Q6_K: quant_gemv.cuh), x in T, fp32
// accumulation. One warp per output row.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace ffnskip::cuda {

enum class GemvOutput {
  Store,       // y[r] = W[r] . x + b[r]
  Accumulate,  // y[r] += W[r] . x + b[r] (the residual add, fused)
  SwiGLU,      // act[i] = silu(W[i] . x + b[i]) * (W[h+i] . x + b[h+i]), h = rows / 2:
               // the stacked [gate; up] projection
};

template <typename T>
struct GemvArgs {
  // [rows, cols] in weight_type: T (rows start 16-byte aligned when cols fills packs), or a
  // native block format (rows of whole blocks, the first 16-byte aligned).
  const void* weight = nullptr;
  TensorType weight_type = dense_tensor_type<T>();
  const float* bias = nullptr;  // [rows] or null
  int rows = 0;
  int cols = 0;
  const T* x = nullptr;  // [cols], 16-byte aligned
  float* y = nullptr;    // Store, Accumulate: [rows]
  T* act = nullptr;      // SwiGLU: [rows / 2]
  // Non-null: the kernel returns before reading anything else when *skip_flag != 0
  // (a gated FFN block that the skip rule skipped on the device).
  const int32_t* skip_flag = nullptr;
};

// Runs the kernel of args.weight_type.
template <typename T>
void launch_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream);

}  // namespace ffnskip::cuda
