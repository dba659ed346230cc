// Portable SIMD vectors through GCC/Clang vector extensions: the same source becomes AVX-512,
// AVX2 or SSE/NEON code depending on the target of the function it is inlined into. The
// kernels are compiled once per instruction set and one is chosen at run time.
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"

namespace ffnskip::cpu {

// A kernel's float vector is one register of its instruction set: zmm, ymm, or 16 bytes on
// the baseline. A generic vector wider than the target's registers has no machine mode in GCC
// and lives in memory, which made the AVX2 float kernels ten times slower.
template <Isa I>
constexpr int kLanes = I == Isa::Avx512 ? 16 : I == Isa::Avx2 ? 8 : 4;

template <typename T, int L>
struct VectorOf {
  typedef T type __attribute__((vector_size(L * sizeof(T))));
};
template <Isa I>
using vfloat = typename VectorOf<float, kLanes<I>>::type;

template <typename V>
constexpr int lanes_of = static_cast<int>(sizeof(V) / sizeof(float));

template <typename V>
__attribute__((always_inline)) inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename V>
__attribute__((always_inline)) inline V splat(float x) {
  return V{} + x;
}

// Pairwise: the halves are added until one lane is left (log2(lanes) dependent adds).
template <typename V>
__attribute__((always_inline)) inline float reduce_add(V v) {
  constexpr int L = lanes_of<V>;
  if constexpr (L == 1) {
    return v[0];
  } else {
    typedef typename VectorOf<float, L / 2>::type Half;
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return reduce_add(lo + hi);
  }
}

// Dot product and y += a * x over float arrays of any length.
template <Isa I>
__attribute__((always_inline)) inline float dot_kernel(const float* a, const float* b,
                                                       int64_t len) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  V acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    acc0 += load<V>(a + i) * load<V>(b + i);
    acc1 += load<V>(a + i + L) * load<V>(b + i + L);
  }
  for (; i + L <= len; i += L) acc0 += load<V>(a + i) * load<V>(b + i);
  float s = reduce_add(acc0 + acc1);
  for (; i < len; ++i) s += a[i] * b[i];
  return s;
}

template <Isa I>
__attribute__((always_inline)) inline void axpy_kernel(float a, const float* x, float* y,
                                                       int64_t len) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  const V av = splat<V>(a);
  int64_t i = 0;
  for (; i + L <= len; i += L) store(y + i, load<V>(y + i) + av * load<V>(x + i));
  for (; i < len; ++i) y[i] += a * x[i];
}

}  // namespace ffnskip::cpu
