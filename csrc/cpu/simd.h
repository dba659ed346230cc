// Portable SIMD vectors through GCC/Clang vector extensions: the same source becomes AVX-512,
// AVX2 or SSE code depending on the target of the function it is inlined into, which the
// kernels choose at run time with target_clones.
#pragma once

#include <cstring>

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

__attribute__((always_inline)) inline float reduce_add(vfloat v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

}  // namespace ffnskip::cpu

// Run-time dispatch between instruction sets for the hot kernels.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FFNSKIP_MULTIVERSION __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define FFNSKIP_MULTIVERSION
#endif
