#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/half.h"
#include "../core/tensor_types.h"
#include "linear.h"

#ifdef FFNSKIP_X86_DISPATCH
#include <immintrin.h>
#endif

namespace ffnskip::cpu {

namespace {

// A block of weights is a sequence of groups of 32 elements (one, or eight in a K-quant
// super-block). Group g of the block, dotted with a block of quantised activations:
//   sum_i w_i x_i ~ factor[g] * d_x * sum_h mul[g][h] * (sum_{i in half h} q_i q8_i)
//                   + sum_h offset[g][h] * d_x * sum_{i in half h} q8_i
// where q_i are the group's stored integers (unsigned, or signed for Q8_0).
struct GroupScales {
  float factor[8];
  int16_t mul[8][2];
  float offset[8][2];
};

// One weight format: its block, groups per block, whether its integers are signed, the scales
// of a block, and group g as 32 integers (scalar; AVX2 below).
template <TensorType kType>
struct Format;

template <typename Block, int kBias>  // w = d * (q - kBias)
struct OffsetFormat {
  using BlockType = Block;
  static constexpr int kGroups = 1;
  static constexpr bool kSigned = false;
  static void scales(const Block& b, GroupScales& s) {
    const float d = f16_to_float(b.d);
    s.factor[0] = d;
    s.mul[0][0] = s.mul[0][1] = 1;
    s.offset[0][0] = s.offset[0][1] = -kBias * d;
  }
};

template <typename Block>  // w = d * q + m
struct MinFormat {
  using BlockType = Block;
  static constexpr int kGroups = 1;
  static constexpr bool kSigned = false;
  static void scales(const Block& b, GroupScales& s) {
    s.factor[0] = f16_to_float(b.d);
    s.mul[0][0] = s.mul[0][1] = 1;
    s.offset[0][0] = s.offset[0][1] = f16_to_float(b.m);
  }
};

// The low and high nibbles of 16 bytes: elements 0..15, then 16..31.
inline void nibbles(const uint8_t* qs, uint8_t* out) {
  for (int j = 0; j < 16; ++j) {
    out[j] = qs[j] & 0xF;
    out[j + 16] = qs[j] >> 4;
  }
}

inline void fifth_bits(const uint8_t* qh, uint8_t* out) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  for (int j = 0; j < 32; ++j) out[j] |= static_cast<uint8_t>(((bits >> j) & 1u) << 4);
}

template <>
struct Format<TensorType::Q4_0> : OffsetFormat<BlockQ4_0, 8> {
  static void unpack(const BlockQ4_0& b, int, uint8_t* out) { nibbles(b.qs, out); }
};
template <>
struct Format<TensorType::Q4_1> : MinFormat<BlockQ4_1> {
  static void unpack(const BlockQ4_1& b, int, uint8_t* out) { nibbles(b.qs, out); }
};
template <>
struct Format<TensorType::Q5_0> : OffsetFormat<BlockQ5_0, 16> {
  static void unpack(const BlockQ5_0& b, int, uint8_t* out) {
    nibbles(b.qs, out);
    fifth_bits(b.qh, out);
  }
};
template <>
struct Format<TensorType::Q5_1> : MinFormat<BlockQ5_1> {
  static void unpack(const BlockQ5_1& b, int, uint8_t* out) {
    nibbles(b.qs, out);
    fifth_bits(b.qh, out);
  }
};
template <>
struct Format<TensorType::Q8_0> {
  using BlockType = BlockQ8_0;
  static constexpr int kGroups = 1;
  static constexpr bool kSigned = true;
  static void scales(const BlockQ8_0& b, GroupScales& s) {
    s.factor[0] = f16_to_float(b.d);
    s.mul[0][0] = s.mul[0][1] = 1;
    s.offset[0][0] = s.offset[0][1] = 0.0f;
  }
  static void unpack(const BlockQ8_0& b, int, uint8_t* out) { std::memcpy(out, b.qs, 32); }
};

// Q4_K / Q5_K: group g has the 6-bit scale and minimum g; w = d * sc * q - dmin * m.
template <typename Block>
struct KFormat {
  using BlockType = Block;
  static constexpr int kGroups = 8;
  static constexpr bool kSigned = false;
  static void scales(const Block& b, GroupScales& s) {
    const float d = f16_to_float(b.d), dmin = f16_to_float(b.dmin);
    for (int g = 0; g < 8; ++g) {
      uint8_t sc, m;
      k_scale_min(b.scales, g, sc, m);
      s.factor[g] = d;
      s.mul[g][0] = s.mul[g][1] = sc;
      s.offset[g][0] = s.offset[g][1] = -dmin * m;
    }
  }
  static void unpack(const Block& b, int g, uint8_t* out) {
    const uint8_t* q = b.qs + 32 * (g / 2);
    for (int l = 0; l < 32; ++l) {
      int v = g % 2 == 0 ? q[l] & 0xF : q[l] >> 4;
      if constexpr (std::is_same_v<Block, BlockQ5_K>) v |= ((b.qh[l] >> g) & 1) << 4;
      out[l] = static_cast<uint8_t>(v);
    }
  }
};
template <>
struct Format<TensorType::Q4_K> : KFormat<BlockQ4_K> {};
template <>
struct Format<TensorType::Q5_K> : KFormat<BlockQ5_K> {};

// Q6_K: groups 4h .. 4h + 3 are the half h of 128 elements; group 4h + k takes the low (k < 2)
// or high nibbles of ql[64h + 32 (k % 2) ..] and bits 2k, 2k + 1 of qh[32h ..]; its halves
// have the int8 scales 8h + 2k and 8h + 2k + 1; w = d * sc * (q - 32).
template <>
struct Format<TensorType::Q6_K> {
  using BlockType = BlockQ6_K;
  static constexpr int kGroups = 8;
  static constexpr bool kSigned = false;
  static void scales(const BlockQ6_K& b, GroupScales& s) {
    const float d = f16_to_float(b.d);
    for (int g = 0; g < 8; ++g) {
      for (int h = 0; h < 2; ++h) {
        const int sc = b.scales[2 * g + h];
        s.mul[g][h] = static_cast<int16_t>(sc);
        s.offset[g][h] = -32.0f * d * static_cast<float>(sc);
      }
      s.factor[g] = d;
    }
  }
  static void unpack(const BlockQ6_K& b, int g, uint8_t* out) {
    const int h = g / 4, k = g % 4;
    const uint8_t* ql = b.ql + 64 * h + 32 * (k % 2);
    const uint8_t* qh = b.qh + 32 * h;
    for (int l = 0; l < 32; ++l) {
      const int lo = k < 2 ? ql[l] & 0xF : ql[l] >> 4;
      out[l] = static_cast<uint8_t>(lo | (((qh[l] >> (2 * k)) & 3) << 4));
    }
  }
};

// ---- the baseline (any CPU): integer dot products in plain C++ ----

constexpr bool is_k_quant(TensorType t) {
  return t == TensorType::Q4_K || t == TensorType::Q5_K || t == TensorType::Q6_K;
}

// Sum of one row of w with one token's activations; for the K-quants the sub-block sums stay
// in integers per super-block (one activation scale), as the SIMD tiles compute them.
template <TensorType kType>
float row_dot_scalar(const typename Format<kType>::BlockType* wb, int64_t blocks,
                     const QuantInput& x, int64_t t) {
  using F = Format<kType>;
  GroupScales s;
  uint8_t q[32];
  float sum = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    F::scales(wb[b], s);
    if constexpr (is_k_quant(kType)) {
      const BlockQ8K& xk = x.x256[t * blocks + b];
      int64_t isum = 0;
      float minimums = 0.0f;  // Q4_K/Q5_K: sum_g offset_g * sums_g
      for (int g = 0; g < 8; ++g) {
        F::unpack(wb[b], g, q);
        for (int h = 0; h < 2; ++h) {
          int32_t half = 0;
          for (int i = 16 * h; i < 16 * h + 16; ++i) {
            const int w = kType == TensorType::Q6_K ? q[i] - 32 : q[i];
            half += w * xk.q[32 * g + i];
          }
          isum += s.mul[g][h] * half;
        }
        if constexpr (kType != TensorType::Q6_K) minimums += s.offset[g][0] * xk.sums[g];
      }
      sum += xk.d * (s.factor[0] * static_cast<float>(isum) + minimums);
    } else {
      const BlockQ8& xb = x.x32[t * blocks + b];
      F::unpack(wb[b], 0, q);
      int32_t isum = 0;
      for (int i = 0; i < 32; ++i) isum += (F::kSigned ? static_cast<int8_t>(q[i]) : q[i]) * xb.q[i];
      sum += s.factor[0] * xb.d * static_cast<float>(isum) +
             s.offset[0][0] * (xb.s[0] + xb.s[1]);
    }
  }
  return sum;
}

template <TensorType kType>
void rows_scalar(const QuantMatrix& w, const QuantInput& x, float* y, int64_t y_stride,
                 int64_t row_begin, int64_t row_end, bool accumulate) {
  using Block = typename Format<kType>::BlockType;
  const int64_t blocks = w.in / block_elements(kType);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const Block* wb = static_cast<const Block*>(w.data) + row * blocks;
    for (int64_t t = 0; t < x.n; ++t) {
      const float sum = row_dot_scalar<kType>(wb, blocks, x, t);
      float& dst = y[t * y_stride + row];
      dst = accumulate ? dst + sum : sum;
    }
  }
}

// The copy of the kernels that runs for `isa`: AVX-512 without VNNI (Skylake-X) runs AVX2's.
enum class QuantKernels { Scalar, Avx2, Avx512Vnni };

QuantKernels quant_kernels(Isa isa) {
  if (isa == Isa::Avx512 && has_avx512_vnni()) return QuantKernels::Avx512Vnni;
  return isa == Isa::Default ? QuantKernels::Scalar : QuantKernels::Avx2;
}

#ifdef FFNSKIP_X86_DISPATCH
// ---- x86 SIMD: the kernels of quant_simd.inc, compiled once per instruction set ----
// The pragma gives every function of a copy its target, templates and lambdas included, so the
// helpers can inline into the tiles (FFNSKIP_QUANT_INLINE makes them: GCC did not always);
// FFNSKIP_QUANT_VNNI selects AVX-512 VNNI's fused dot products (vpdpbusd, vpdpwssd) in place of
// vpmaddubsw/vpmaddwd/vpaddd, with equal integer sums, and the tiles that fit its 32 vector
// registers.
#define FFNSKIP_QUANT_INLINE __attribute__((always_inline)) inline
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#include "quant_simd.inc"
#pragma GCC pop_options
}  // namespace avx2

namespace avx512_vnni {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512vnni")
#define FFNSKIP_QUANT_VNNI 1
#include "quant_simd.inc"
#undef FFNSKIP_QUANT_VNNI
#pragma GCC pop_options
}  // namespace avx512_vnni
#undef FFNSKIP_QUANT_INLINE
#endif

template <TensorType kType>
void rows_of_type(const QuantMatrix& w, const QuantInput& x, float* y, int64_t y_stride,
                  int64_t row_begin, int64_t row_end, bool accumulate, Isa isa) {
  switch (quant_kernels(isa)) {
#ifdef FFNSKIP_X86_DISPATCH
    case QuantKernels::Avx512Vnni:
      return avx512_vnni::rows_simd<kType>(w, x, y, y_stride, row_begin, row_end, accumulate);
    case QuantKernels::Avx2:
      return avx2::rows_simd<kType>(w, x, y, y_stride, row_begin, row_end, accumulate);
#endif
    default:
      return rows_scalar<kType>(w, x, y, y_stride, row_begin, row_end, accumulate);
  }
}

// A block of kSize activations to int8: returns its scale, writes the sums of q per 16.
template <int kSize>
float quantize_block_scalar(const float* v, int8_t* q, int32_t* sums16) {
  float amax = 0.0f;
  for (int i = 0; i < kSize; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int h = 0; h < kSize / 16; ++h) {
    int32_t sum = 0;
    for (int i = 16 * h; i < 16 * h + 16; ++i) {
      q[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
      sum += q[i];
    }
    sums16[h] = sum;
  }
  return amax / 127.0f;
}

// The rest of a block from its scale and its sums per 16.
void finish_block(float d, const int32_t* sums16, BlockQ8& out) {
  out.d = d;
  for (int h = 0; h < 2; ++h) out.s[h] = d * static_cast<float>(sums16[h]);
}
void finish_block(float d, const int32_t* sums16, BlockQ8K& out) {
  out.d = d;
  for (int g = 0; g < 8; ++g) out.sums[g] = static_cast<int16_t>(sums16[2 * g] + sums16[2 * g + 1]);
  for (int j = 0; j < 16; ++j) out.sums16[j] = static_cast<int16_t>(sums16[j]);
}

template <typename Block>
void quantize_blocks(const float* x, int64_t n, int64_t in, Block* out, Isa isa) {
  constexpr int kSize = sizeof(Block::q);
  float (*quantize_block)(const float*, int8_t*, int32_t*) = quantize_block_scalar<kSize>;
#ifdef FFNSKIP_X86_DISPATCH
  switch (quant_kernels(isa)) {
    case QuantKernels::Avx512Vnni: quantize_block = avx512_vnni::quantize_block_simd<kSize>; break;
    case QuantKernels::Avx2: quantize_block = avx2::quantize_block_simd<kSize>; break;
    default: break;
  }
#endif
  const int64_t blocks = n * in / kSize;
  for (int64_t b = 0; b < blocks; ++b, x += kSize, ++out) {
    int32_t sums16[kSize / 16];
    const float d = quantize_block(x, out->q, sums16);
    finish_block(d, sums16, *out);
  }
}

}  // namespace

bool uses_k_activations(TensorType type) { return is_k_quant(type); }

const char* quant_kernels_name(Isa isa) {
  switch (quant_kernels(isa)) {
    case QuantKernels::Avx512Vnni: return "avx512-vnni";
    case QuantKernels::Avx2: return "avx2";
    default: return "scalar";
  }
}

void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8* out, Isa isa) {
  quantize_blocks(x, n, in, out, isa);
}

void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8K* out, Isa isa) {
  quantize_blocks(x, n, in, out, isa);
}

void quant_rows(const QuantMatrix& w, const QuantInput& x, float* y, int64_t y_stride,
                int64_t row_begin, int64_t row_end, bool accumulate, Isa isa) {
  switch (w.type) {
#define FFNSKIP_QUANT_CASE(T)                                                              \
  case TensorType::T:                                                                      \
    return rows_of_type<TensorType::T>(w, x, y, y_stride, row_begin, row_end, accumulate, \
                                       isa);
    FFNSKIP_QUANT_CASE(Q8_0)
    FFNSKIP_QUANT_CASE(Q4_0)
    FFNSKIP_QUANT_CASE(Q4_1)
    FFNSKIP_QUANT_CASE(Q5_0)
    FFNSKIP_QUANT_CASE(Q5_1)
    FFNSKIP_QUANT_CASE(Q4_K)
    FFNSKIP_QUANT_CASE(Q5_K)
    FFNSKIP_QUANT_CASE(Q6_K)
#undef FFNSKIP_QUANT_CASE
    default:
      break;
  }
}

}  // namespace ffnskip::cpu
