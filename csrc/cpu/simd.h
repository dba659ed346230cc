// Portable SIMD vectors through GCC/Clang vector extensions: the same source becomes AVX-512,
// AVX2 or SSE/NEON code depending on the target of the function it is inlined into. The
// kernels are compiled once per instruction set and one is chosen at run time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "../core/half.h"
#include "isa.h"

#ifdef FFNSKIP_X86_DISPATCH
#include <immintrin.h>
#endif

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

template <Isa I>
using vu16 = typename VectorOf<uint16_t, kLanes<I>>::type;
template <Isa I>
using vu32 = typename VectorOf<uint32_t, kLanes<I>>::type;

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

// Lane i of v in every lane: one in-register permute. (GCC 12 builds a splat of a float loaded
// in a loop from one masked broadcast per lane.)
template <typename V>
__attribute__((always_inline)) inline V broadcast_lane(V v, int i) {
  using Mask = typename VectorOf<int32_t, lanes_of<V>>::type;
  return __builtin_shuffle(v, Mask{} + i);
}

// The first `count` (< lanes) floats at p, the other lanes zero; and the converse store.
template <typename V>
__attribute__((always_inline)) inline V load_partial(const float* p, int count) {
  V v{};
  std::memcpy(&v, p, sizeof(float) * count);
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void store_partial(float* p, V v, int count) {
  std::memcpy(p, &v, sizeof(float) * count);
}

#ifdef FFNSKIP_X86_DISPATCH
// F16C conversions. Not always_inline: the intrinsics may only be inlined into code compiled
// for their target, which the kernel templates are not until they are inlined into a
// per-instruction-set entry point; `flatten` there inlines these.
FFNSKIP_TARGET_AVX512 inline vfloat<Isa::Avx512> widen_f16_avx512(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  // maskz: no -Wmaybe-uninitialized
  return bits_as<vfloat<Isa::Avx512>>(_mm512_maskz_cvtph_ps(0xFFFF, h));
}

FFNSKIP_TARGET_AVX2 inline vfloat<Isa::Avx2> widen_f16_avx2(const uint16_t* p) {
  return bits_as<vfloat<Isa::Avx2>>(
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// kLanes<I> fp16 values (their bits) at p, widened: F16C where the instruction set has it,
// integer operations on the baseline.
template <Isa I>
__attribute__((always_inline)) inline vfloat<I> load_f16(const uint16_t* p) {
#ifdef FFNSKIP_X86_DISPATCH
  if constexpr (I == Isa::Avx512) {
    return widen_f16_avx512(p);
  } else if constexpr (I == Isa::Avx2) {
    return widen_f16_avx2(p);
  }
#endif
  vu16<I> h;
  std::memcpy(&h, p, sizeof(h));
  return widen_f16<vfloat<I>>(__builtin_convertvector(h, vu32<I>));
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

// The largest lane (scalar compares: once per row of scores, not in an inner loop).
template <typename V>
__attribute__((always_inline)) inline float reduce_max(V v) {
  float m = v[0];
  for (int i = 1; i < lanes_of<V>; ++i) m = v[i] > m ? v[i] : m;
  return m;
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

// Lane i of the result is the sum of the lanes of acc[i], for as many vectors as lanes (acc is
// overwritten): log2(lanes) passes in which pairs of vectors, each holding its keys' partial
// sums in equal segments, become one vector with twice the keys and half the partials each.
// One two-source shuffle per half (vpermt2ps on AVX-512) instead of a full reduction per sum.
constexpr int combined_lane(int lanes, int segment, bool upper, int lane) {
  const int half = segment / 2, per_input = lanes / segment;
  const int out_segment = lane / half;
  return (out_segment < per_input ? 0 : lanes) + (out_segment % per_input) * segment +
         (upper ? half : 0) + lane % half;
}

template <typename Mask, int kSegment, bool kUpper, int... kLane>
constexpr Mask combine_mask(std::integer_sequence<int, kLane...>) {
  return Mask{combined_lane(static_cast<int>(sizeof...(kLane)), kSegment, kUpper, kLane)...};
}

template <typename V, int kSegment = lanes_of<V>>
__attribute__((always_inline)) inline V transpose_sum(V* acc) {
  constexpr int L = lanes_of<V>;
  if constexpr (kSegment == 1) {
    return acc[0];
  } else {
    using Mask = typename VectorOf<int32_t, L>::type;
    constexpr auto lanes = std::make_integer_sequence<int, L>{};
    constexpr Mask lower = combine_mask<Mask, kSegment, false>(lanes);
    constexpr Mask upper = combine_mask<Mask, kSegment, true>(lanes);
    constexpr int pairs = kSegment / 2;  // as many vectors are left as partials per key
    for (int i = 0; i < pairs; ++i) {
      acc[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], lower) +
               __builtin_shuffle(acc[2 * i], acc[2 * i + 1], upper);
    }
    return transpose_sum<V, kSegment / 2>(acc);
  }
}

// e^x: Cephes' expf, a degree-6 polynomial on x - n ln 2 (about 1 ulp), scaled by 2^n through
// the exponent bits; exactly 0 below -87.3 (where floats stop being normal) and inf above 88
// (e^88 = 1.7e38, so that 2^n stays a normal float).
template <typename V>
__attribute__((always_inline)) inline V exp_kernel(V x) {
  using Int = typename VectorOf<int32_t, lanes_of<V>>::type;
  constexpr float kLowest = -87.33f;
  constexpr float kHighest = 88.0f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Int underflows = x < kLowest;
  const Int overflows = x > kHighest;
  x = x < kLowest ? splat<V>(kLowest) : x;
  x = x > kHighest ? splat<V>(kHighest) : x;
  const V n = (x * 1.44269504088896341f + kRound) - kRound;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const Int bits = (__builtin_convertvector(n, Int) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const V y = underflows ? V{} : p * scale;
  return overflows ? splat<V>(INFINITY) : y;
}

}  // namespace ffnskip::cpu
