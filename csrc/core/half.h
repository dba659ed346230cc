// fp16 and bf16 bits to and from fp32, for the host side of every backend and the CPU kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace ffnskip {

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

// IEEE fp16 bits (the low 16 bits of U: uint32_t, or a vector of them) widened to F (float, or
// the float vector of U's width). Integer operations only, so it vectorises on any target and
// never feeds a subnormal to the FPU (slow on x86, flushed under DAZ).
template <typename F, typename U>
__attribute__((always_inline)) inline F widen_f16(U h) {
  const U shifted = (h & 0x7FFFu) << 13;  // exponent and mantissa at their fp32 positions
  const U exponent = shifted & 0x0F800000u;
  U bits = shifted + 0x38000000u;  // exponent bias 15 -> 127
  bits = exponent == 0x0F800000u ? bits + 0x38000000u : bits;  // inf/nan: all ones
  // Zero and subnormals, m * 2^-24: as 2^-14 * (1 + m / 1024), minus 2^-14 (exact).
  const F subnormal = bits_as<F>(U(bits + 0x00800000u)) - 0x1p-14f;
  const U magnitude = exponent == 0u ? bits_as<U>(subnormal) : bits;
  return bits_as<F>(U(magnitude | (h & 0x8000u) << 16));
}

inline float f16_to_float(uint16_t bits) { return widen_f16<float>(uint32_t{bits}); }

// Rounds to nearest even; beyond the fp16 range becomes infinity, NaN stays NaN.
inline uint16_t float_to_f16(float f) {
  uint32_t u = bits_as<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u >= 0x47800000u) return sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u);  // >= 65536
  if (u < 0x38800000u) {
    // Below 2^-14, fp16 is fixed point in steps of 2^-24: adding 0.5 lets the FPU round the
    // value to that step in the low mantissa bits.
    return sign | static_cast<uint16_t>(bits_as<uint32_t>(bits_as<float>(u) + 0.5f) -
                                        0x3F000000u);
  }
  // Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  u += 0xC8000FFFu + ((u >> 13) & 1u);
  return sign | static_cast<uint16_t>(u >> 13);
}

}  // namespace ffnskip
