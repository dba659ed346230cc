// Linear layers y = x W^T + b with fp32, bf16 or fp16 weights and fp32 activations and
// accumulation: a GEMV for one token, a blocked GEMM for many.
#pragma once

#include <cstdint>

#include "isa.h"
#include "storage.h"
#include "thread_pool.h"

namespace ffnskip::cpu {

struct LinearWeights {
  const void* weight = nullptr;  // [out, in], row-major, of `type`
  const float* bias = nullptr;   // [out] or null
  int64_t out = 0;
  int64_t in = 0;
  WeightType type = WeightType::F32;

  // Rows [first, first + count) as a linear of their own.
  LinearWeights rows(int64_t first, int64_t count) const;
};

enum class Output { Overwrite, Accumulate };

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
