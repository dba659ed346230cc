#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../core/half.h"
#include "../core/tensor_types.h"

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

template <TensorType kType>
void rows_scalar(const QuantMatrix& w, const BlockQ8* xq, int64_t n, float* y, int64_t y_stride,
                 int64_t row_begin, int64_t row_end, bool accumulate) {
  using F = Format<kType>;
  using Block = typename F::BlockType;
  const int64_t blocks = w.in / block_elements(kType);
  const int64_t x_blocks = w.in / 32;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const Block* wb = static_cast<const Block*>(w.data) + row * blocks;
    for (int64_t t = 0; t < n; ++t) {
      const BlockQ8* xb = xq + t * x_blocks;
      float sum = 0.0f;
      GroupScales s;
      uint8_t q[32];
      for (int64_t b = 0; b < blocks; ++b) {
        F::scales(wb[b], s);
        for (int g = 0; g < F::kGroups; ++g) {
          F::unpack(wb[b], g, q);
          const BlockQ8& x = xb[b * F::kGroups + g];
          int32_t isum = 0;
          for (int h = 0; h < 2; ++h) {
            int32_t half = 0;
            for (int i = 16 * h; i < 16 * h + 16; ++i) {
              half += (F::kSigned ? static_cast<int8_t>(q[i]) : q[i]) * x.q[i];
            }
            isum += s.mul[g][h] * half;
            sum += s.offset[g][h] * x.s[h];
          }
          sum += s.factor[g] * x.d * static_cast<float>(isum);
        }
      }
      float& dst = y[t * y_stride + row];
      dst = accumulate ? dst + sum : sum;
    }
  }
}

#ifdef FFNSKIP_X86_DISPATCH
// ---- AVX2 (also the AVX-512 path: the same instructions, compiled for it) ----

FFNSKIP_TARGET_AVX2 inline __m256i nibbles_avx2(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// 0x10 in byte j where bit j of the 32 bits at qh is set.
FFNSKIP_TARGET_AVX2 inline __m256i fifth_bits_avx2(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  // Byte j gets byte j / 8 of the bits (the shuffle works within 128-bit lanes, each of which
  // holds the 4 bytes repeated), then its own bit j % 8 is tested.
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

template <TensorType kType>
FFNSKIP_TARGET_AVX2 inline __m256i unpack_avx2(const typename Format<kType>::BlockType& b,
                                                int g) {
  if constexpr (kType == TensorType::Q4_0 || kType == TensorType::Q4_1) {
    return nibbles_avx2(b.qs);
  } else if constexpr (kType == TensorType::Q5_0 || kType == TensorType::Q5_1) {
    return _mm256_or_si256(nibbles_avx2(b.qs), fifth_bits_avx2(b.qh));
  } else if constexpr (kType == TensorType::Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
  } else if constexpr (kType == TensorType::Q4_K || kType == TensorType::Q5_K) {
    __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * (g / 2)));
    if (g % 2 == 1) q = _mm256_srli_epi16(q, 4);
    q = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
    if constexpr (kType == TensorType::Q5_K) {
      const __m256i mask = _mm256_set1_epi8(static_cast<char>(1 << g));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh));
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, mask), mask);
      q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
    }
    return q;
  } else {  // Q6_K
    const int h = g / 4, k = g % 4;
    __m256i lo = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(b.ql + 64 * h + 32 * (k % 2)));
    if (k >= 2) lo = _mm256_srli_epi16(lo, 4);
    lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * h));
    __m256i hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k));
    hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
    return _mm256_or_si256(lo, hi);
  }
}

FFNSKIP_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The scale (and minimum) of a 32-element block with F16C.
FFNSKIP_TARGET_AVX2 inline float fp16_avx2(uint16_t h) { return _cvtsh_ss(h); }

// factor and offset of a 32-element block: sum_i w_i x_i = factor * d_x * isum + offset * s_x.
template <TensorType kType>
FFNSKIP_TARGET_AVX2 inline void block_scales_avx2(const typename Format<kType>::BlockType& b,
                                                  float& factor, float& offset) {
  factor = fp16_avx2(b.d);
  if constexpr (kType == TensorType::Q4_1 || kType == TensorType::Q5_1) {
    offset = fp16_avx2(b.m);
  } else if constexpr (kType == TensorType::Q4_0) {
    offset = -8.0f * factor;
  } else if constexpr (kType == TensorType::Q5_0) {
    offset = -16.0f * factor;
  } else {
    offset = 0.0f;
  }
}

FFNSKIP_TARGET_AVX2 inline __m256i dot_pairs_avx2(__m256i q, __m256i x, bool is_signed) {
  // vpmaddubsw multiplies unsigned by signed bytes: a signed q lends its sign to x.
  return is_signed ? _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q))
                   : _mm256_maddubs_epi16(q, x);
}

// R weight rows times T tokens: each group of weights is unpacked once for the T tokens.
template <TensorType kType, int R, int T>
FFNSKIP_TARGET_AVX2 void tile_avx2(const QuantMatrix& w, int64_t row, const BlockQ8* xq,
                                   int64_t x_blocks, float* y, int64_t y_stride,
                                   bool accumulate) {
  using F = Format<kType>;
  using Block = typename F::BlockType;
  const int64_t blocks = w.in / block_elements(kType);
  const Block* wb[R];
  for (int r = 0; r < R; ++r) wb[r] = static_cast<const Block*>(w.data) + (row + r) * blocks;
  // The offset terms go into lanes 0 and 1 of the same accumulators (s_x of the two halves
  // times the weights' offsets): the final horizontal sum adds them.
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  if constexpr (F::kGroups == 1) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i q[R];
      float factor[R], off[R];
      for (int r = 0; r < R; ++r) {
        q[r] = unpack_avx2<kType>(wb[r][b], 0);
        block_scales_avx2<kType>(wb[r][b], factor[r], off[r]);
      }
      for (int t = 0; t < T; ++t) {
        const BlockQ8& x = xq[t * x_blocks + b];
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q));
        const __m256 xd = _mm256_broadcast_ss(&x.d);
        const __m256 xs = _mm256_castps128_ps256(_mm_castsi128_ps(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x.s))));
        for (int r = 0; r < R; ++r) {
          const __m256 sums = _mm256_cvtepi32_ps(
              _mm256_madd_epi16(dot_pairs_avx2(q[r], xv, F::kSigned), ones));
          acc[r][t] = _mm256_fmadd_ps(sums, _mm256_mul_ps(xd, _mm256_set1_ps(factor[r])),
                                      acc[r][t]);
          if constexpr (kType != TensorType::Q8_0) {
            acc[r][t] = _mm256_fmadd_ps(xs, _mm256_set1_ps(off[r]), acc[r][t]);
          }
        }
      }
    }
  } else {
    GroupScales s[R];
    for (int64_t b = 0; b < blocks; ++b) {
      for (int r = 0; r < R; ++r) F::scales(wb[r][b], s[r]);
      for (int g = 0; g < F::kGroups; ++g) {
        __m256i q[R], mul[R];
        __m256 off[R];
        for (int r = 0; r < R; ++r) {
          q[r] = unpack_avx2<kType>(wb[r][b], g);
          mul[r] = _mm256_set_m128i(_mm_set1_epi16(s[r].mul[g][1]),
                                    _mm_set1_epi16(s[r].mul[g][0]));
          off[r] = _mm256_castps128_ps256(_mm_setr_ps(s[r].offset[g][0], s[r].offset[g][1],
                                                      0.0f, 0.0f));
        }
        for (int t = 0; t < T; ++t) {
          const BlockQ8& x = xq[t * x_blocks + b * F::kGroups + g];
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q));
          const __m256 xd = _mm256_broadcast_ss(&x.d);
          const __m256 xs = _mm256_castps128_ps256(_mm_castsi128_ps(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x.s))));
          for (int r = 0; r < R; ++r) {
            const __m256 sums = _mm256_cvtepi32_ps(
                _mm256_madd_epi16(dot_pairs_avx2(q[r], xv, F::kSigned), mul[r]));
            acc[r][t] = _mm256_fmadd_ps(sums, _mm256_mul_ps(xd, _mm256_set1_ps(s[r].factor[g])),
                                        acc[r][t]);
            acc[r][t] = _mm256_fmadd_ps(xs, off[r], acc[r][t]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      const float v = hsum_avx2(acc[r][t]);
      float& dst = y[t * y_stride + row + r];
      dst = accumulate ? dst + v : v;
    }
  }
}

// Tokens in blocks whose activations stay in L2 while the rows stream past; within a block,
// tiles of 2 rows x 4 tokens, and 4 rows x 1 token for the rest (and for decode).
constexpr int64_t kTokenBlock = 64;

template <TensorType kType>
FFNSKIP_TARGET_AVX2 void rows_avx2(const QuantMatrix& w, const BlockQ8* xq, int64_t n, float* y,
                                   int64_t y_stride, int64_t row_begin, int64_t row_end,
                                   bool accumulate) {
  const int64_t x_blocks = w.in / 32;
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t t_end = std::min(n, t0 + kTokenBlock);
    const int64_t t_tiled = t0 + (t_end - t0) / 4 * 4;
    int64_t row = row_begin;
    for (; row + 2 <= row_end; row += 2) {
      for (int64_t t = t0; t < t_tiled; t += 4) {
        tile_avx2<kType, 2, 4>(w, row, xq + t * x_blocks, x_blocks, y + t * y_stride, y_stride,
                               accumulate);
      }
    }
    for (; row < row_end; ++row) {
      for (int64_t t = t0; t < t_tiled; t += 4) {
        tile_avx2<kType, 1, 4>(w, row, xq + t * x_blocks, x_blocks, y + t * y_stride, y_stride,
                               accumulate);
      }
    }
    for (int64_t t = t_tiled; t < t_end; ++t) {  // one token (decode), or a block's last few
      int64_t r = row_begin;
      for (; r + 4 <= row_end; r += 4) {
        tile_avx2<kType, 4, 1>(w, r, xq + t * x_blocks, x_blocks, y + t * y_stride, y_stride,
                               accumulate);
      }
      for (; r < row_end; ++r) {
        tile_avx2<kType, 1, 1>(w, r, xq + t * x_blocks, x_blocks, y + t * y_stride, y_stride,
                               accumulate);
      }
    }
  }
}
#endif

template <TensorType kType>
void rows_of_type(const QuantMatrix& w, const BlockQ8* xq, int64_t n, float* y,
                  int64_t y_stride, int64_t row_begin, int64_t row_end, bool accumulate,
                  Isa isa) {
#ifdef FFNSKIP_X86_DISPATCH
  if (isa != Isa::Default) {
    rows_avx2<kType>(w, xq, n, y, y_stride, row_begin, row_end, accumulate);
    return;
  }
#endif
  (void)isa;
  rows_scalar<kType>(w, xq, n, y, y_stride, row_begin, row_end, accumulate);
}

}  // namespace

void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8* out) {
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t b = 0; b < in / 32; ++b, ++out) {
      const float* v = x + t * in + b * 32;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.0f;
      const float inv = d > 0.0f ? 1.0f / d : 0.0f;
      out->d = d;
      for (int h = 0; h < 2; ++h) {
        int sum = 0;
        for (int i = 16 * h; i < 16 * h + 16; ++i) {
          const int q = static_cast<int>(std::nearbyint(v[i] * inv));
          out->q[i] = static_cast<int8_t>(q);
          sum += q;
        }
        out->s[h] = d * static_cast<float>(sum);
      }
    }
  }
}

void quant_rows(const QuantMatrix& w, const BlockQ8* xq, int64_t n, float* y, int64_t y_stride,
                int64_t row_begin, int64_t row_end, bool accumulate, Isa isa) {
  switch (w.type) {
#define FFNSKIP_QUANT_CASE(T)                                                             \
  case TensorType::T:                                                                     \
    return rows_of_type<TensorType::T>(w, xq, n, y, y_stride, row_begin, row_end, accumulate, \
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
