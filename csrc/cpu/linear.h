// Linear layers y = x W^T + b on fp32 weights: a GEMV for one token, a blocked GEMM for many.
#pragma once

#include <cstdint>

#include "thread_pool.h"

namespace ffnskip::cpu {

struct LinearWeights {
  const float* weight = nullptr;  // [out, in], row-major
  const float* bias = nullptr;    // [out] or null
  int64_t out = 0;
  int64_t in = 0;
};

enum class Output { Overwrite, Accumulate };

// y[t, :] = x[t, :] W^T + b for t < n (Accumulate: y[t, :] += ..., which fuses a residual add).
// x is [n, in], y is [n, out]; rows are split across the pool so each weight row is read once.
void linear(ThreadPool& pool, const LinearWeights& w, const float* x, int64_t n, float* y,
            Output mode = Output::Overwrite);

// Dot product of two float arrays (used by attention).
float dot(const float* a, const float* b, int64_t len);
// y += a * x
void axpy(float a, const float* x, float* y, int64_t len);

}  // namespace ffnskip::cpu
