// Linear layers y = x W^T + b with fp32, bf16, fp16 or quantised (quant.h) weights and fp32
// activations and accumulation: a GEMV for one token, a blocked GEMM for many.
#pragma once

#include <cstdint>

#include <initializer_list>

#include "ffnskip/weights.h"
#include "isa.h"
#include "thread_pool.h"

namespace ffnskip::cpu {

// A linear y = x W^T + b whose rows come from up to three matrices stored apart (q, k and v of a
// checkpoint, gate and up), each [rows, in] row-major in its own format, read in place: float
// (F32, F16, BF16) or GGUF blocks (tensor_types.h).
struct LinearWeights {
  struct Part {
    const void* data = nullptr;
    TensorType type = TensorType::F32;
    int64_t rows = 0;
  };
  static constexpr int kMaxParts = 3;
  Part parts[kMaxParts];
  int num_parts = 0;
  const float* bias = nullptr;  // [out] (the parts' biases stacked) or null
  int64_t out = 0;              // rows of all parts
  int64_t in = 0;

  LinearWeights() = default;
  LinearWeights(std::initializer_list<Part> parts, int64_t in, const float* bias = nullptr);
  // Parts [first, first + count) as a linear of their own.
  LinearWeights slice(int first, int count) const;
  bool any_of(bool (*predicate)(TensorType)) const;
};

enum class Output { Overwrite, Accumulate };

// Passes of up to this many tokens compute each token's outputs exactly as a one-token step
// does (bit for bit: the same sums in the same order), so that a speculative verification's
// logits are the steps' and its greedy output the dense model's. The kernels that sum in
// another order (the float panels, attention as GEMMs) start above it.
constexpr int64_t kStepExactTokens = 16;

// y[t, :] = x[t, :] W^T + b for t < n (Accumulate: y[t, :] += ..., which fuses a residual add).
// x is [n, in], y is [n, out]; rows are split across the pool so each weight row is read once.
// `isa` picks the kernels' instruction set (tests cover each one the CPU has).
void linear(ThreadPool& pool, const LinearWeights& w, const float* x, int64_t n, float* y,
            Output mode = Output::Overwrite, Isa isa = kernel_isa());

// Dot product of two float arrays.
float dot(const float* a, const float* b, int64_t len, Isa isa = kernel_isa());
// y += a * x
void axpy(float a, const float* x, float* y, int64_t len, Isa isa = kernel_isa());

}  // namespace ffnskip::cpu
