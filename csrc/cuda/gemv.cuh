// Decode linears, one token: y = W x (+ b), W [rows, cols] stored in T (fp32, fp16 or bf16),
// x in T, fp32 accumulation. One warp per output row, 16-byte loads, several in flight.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffnskip::cuda {

enum class GemvOutput {
  Store,       // y[r] = W[r] . x + b[r]
  Accumulate,  // y[r] += W[r] . x + b[r] (the residual add, fused)
  SwiGLU,      // act[i] = silu(W[i] . x + b[i]) * (W[h+i] . x + b[h+i]), h = rows / 2:
               // the stacked [gate; up] projection
};

template <typename T>
struct GemvArgs {
  const T* weight = nullptr;  // [rows, cols], rows start 16-byte aligned when cols fills packs
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

template <typename T>
void launch_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream);

}  // namespace ffnskip::cuda
