// Linear layers y = x W^T + b with fp32 or bf16 weights and fp32 activations and
// accumulation: a GEMV for one token, a blocked GEMM for many.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "thread_pool.h"

namespace ffnskip::cpu {

enum class WeightType { F32, BF16 };

template <typename To, typename From>
__attribute__((always_inline)) inline To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

// bf16 is the top half of an fp32: widening is a shift, narrowing rounds to nearest even.
inline float bf16_to_float(uint16_t bits) {
  return bits_as<float>(static_cast<uint32_t>(bits) << 16);
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_as<uint32_t>(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // finite inputs only
}

std::vector<uint16_t> to_bf16(const float* data, int64_t count);

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
void linear(ThreadPool& pool, const LinearWeights& w, const float* x, int64_t n, float* y,
            Output mode = Output::Overwrite);

// Dot product of two float arrays (used by attention).
float dot(const float* a, const float* b, int64_t len);
// y += a * x
void axpy(float a, const float* x, float* y, int64_t len);

}  // namespace ffnskip::cpu
