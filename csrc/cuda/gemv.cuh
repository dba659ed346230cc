// Decode linears, one token: y = W x (+ b), W [rows, cols] stored in T (fp32, fp16 or bf16) or in
// a GGUF block format read in place (Q8_0, Q5_0, Q4_K, Q6_K: quant_gemv.cuh, which quantises x
// to int8 blocks first), x in T, fp32 accumulation. One warp per output row.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "rope.cuh"

namespace ffnskip::cuda {

enum class GemvOutput {
  Store,       // y[r] = W[r] . x + b[r]
  Accumulate,  // y[r] += W[r] . x + b[r] (the residual add, fused)
  SwiGLU,      // act[i] = silu(W[i] . x + b[i]) * (W[h+i] . x + b[h+i]), h = rows / 2:
               // the stacked [gate; up] projection
  RopeKv,      // the stacked [q; k; v] projection with RoPE and the KV-cache write (rope.cuh's
               // arithmetic): rotated q rows into y, rotated k and plain v rows into the caches
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
  // Non-null: the input is RMSNorm(norm_x) with this weight, computed by each block (the norm
  // kernel's arithmetic, staged in shared memory) in place of x: one launch fewer per linear.
  const float* norm_weight = nullptr;  // [cols]
  const float* norm_x = nullptr;       // [cols] fp32: the residual stream's row
  float norm_eps = 0.0f;
  float* y = nullptr;    // Store, Accumulate: [rows]
  T* act = nullptr;      // SwiGLU: [rows / 2]
  // RopeKv: W holds rows first_row.. of the rope.stack() rows of [q; k; v] (both ends on head
  // boundaries), y the q rows from first_row on; the caches [max_seq_len, kv_dim] get row *pos.
  int first_row = 0;
  RopeKvLayout rope;
  T* k_cache = nullptr;
  T* v_cache = nullptr;
  // Non-null: the kernel returns before reading anything else when *skip_flag != 0
  // (a gated FFN block that the skip rule skipped on the device).
  const int32_t* skip_flag = nullptr;
};

// The most shared memory a GEMV stages its input in (the default 48 KiB a block may take, less
// the kernels' static scratch): the dense GEMV's RMSNorm prologue 11776 fp32 or 23552 16-bit
// values (gemv_folds_norm), the block GEMV's int8 activations with their scales and sums about
// 34000 values (quant_gemv.cuh), normed or not.
constexpr size_t kGemvStagedInputBytes = 46 * 1024;

template <typename T>
constexpr bool gemv_folds_norm(int cols) {
  return static_cast<size_t>(cols) * sizeof(T) <= kGemvStagedInputBytes;
}

// Runs the kernel of args.weight_type. Throws std::invalid_argument for an input wider than
// its kernel stages: a normed one beyond gemv_folds_norm on dense weights.
template <typename T>
void launch_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream);

}  // namespace ffnskip::cuda
