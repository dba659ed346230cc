// Portable SIMD vectors through GCC/Clang vector extensions: the same source becomes AVX-512,
// AVX2 or SSE code depending on the target of the function it is inlined into. The kernels are
// compiled once per instruction set below and one is chosen at run time.
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"

namespace ffnskip::cpu {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

__attribute__((always_inline)) inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

__attribute__((always_inline)) inline void store(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}

__attribute__((always_inline)) inline vfloat splat(float x) {
  return vfloat{} + x;
}

// Pairwise: the halves are added until one lane is left, 4 dependent adds instead of 15.
__attribute__((always_inline)) inline float reduce_add(vfloat v) {
  typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
  typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
  v8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof(lo8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  const v8 s8 = lo8 + hi8;
  v4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof(lo4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(lo4), sizeof(hi4));
  const v4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Dot product and y += a * x over float arrays of any length.
__attribute__((always_inline)) inline float dot_kernel(const float* a, const float* b,
                                                       int64_t len) {
  vfloat acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
    acc0 += load(a + i) * load(b + i);
    acc1 += load(a + i + kLanes) * load(b + i + kLanes);
  }
  for (; i + kLanes <= len; i += kLanes) acc0 += load(a + i) * load(b + i);
  float s = reduce_add(acc0 + acc1);
  for (; i < len; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((always_inline)) inline void axpy_kernel(float a, const float* x, float* y,
                                                       int64_t len) {
  const vfloat av = splat(a);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) store(y + i, load(y + i) + av * load(x + i));
  for (; i < len; ++i) y[i] += a * x[i];
}

}  // namespace ffnskip::cpu
