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

#ifdef FFNSKIP_X86_DISPATCH
// ---- AVX2 (also the AVX-512 path: the same instructions, compiled for it) ----

FFNSKIP_TARGET_AVX2 inline __m256i nibbles_avx2(const uint8_t* qs) {
  // The 16 bytes in both 128-bit lanes, the high lane shifted down by a nibble.
  const __m256i both =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  const __m256i shifted = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
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

// The integer offset of a 32-element format's values (w = d * (q - offset)), subtracted in the
// integer sums; Q4_1/Q5_1 have a float minimum instead.
template <TensorType kType>
constexpr int kIntegerOffset = kType == TensorType::Q4_0 ? 8 : kType == TensorType::Q5_0 ? 16 : 0;
template <TensorType kType>
constexpr bool kHasMinimum = kType == TensorType::Q4_1 || kType == TensorType::Q5_1;

// factor and minimum of a 32-element block: sum_i w_i x_i = factor * d_x * isum + m * s_x.
template <TensorType kType>
FFNSKIP_TARGET_AVX2 inline void block_scales_avx2(const typename Format<kType>::BlockType& b,
                                                  float& factor, float& minimum) {
  factor = fp16_avx2(b.d);
  if constexpr (kHasMinimum<kType>) {
    minimum = fp16_avx2(b.m);
  } else {
    minimum = 0.0f;
  }
}

// The scales of a K-quant super-block as the AVX2 tile uses them.
struct KScales {
  float d, dmin;
  alignas(16) int16_t mul[8];    // Q4_K/Q5_K: the 6-bit scale of each sub-block of 32
  alignas(16) int16_t mins[8];   // Q4_K/Q5_K: the 6-bit minimum of each sub-block
  alignas(16) int8_t mul6[16];   // Q6_K: the int8 scale of each sub-block of 16
  alignas(32) int16_t mul16[16];  // Q6_K: the same, widened for vpmaddwd with sums16
};

// Q4_K/Q5_K's 12 bytes of scales as words w0..w2 (bytes s0..s11): scales 0-3 are s0-3 & 63,
// minimums 0-3 are s4-7 & 63; scale 4 + j is the low nibble of s8+j with the top two bits of
// s_j above it, minimum 4 + j the high nibble of s8+j with the top two bits of s4+j.
FFNSKIP_TARGET_AVX2 inline void k4_scale_bytes(const uint8_t* scales, uint8_t* sc, uint8_t* m) {
  uint32_t w[3];
  std::memcpy(w, scales, 12);
  const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, low2 = 0x03030303u;
  const uint32_t words[4] = {w[0] & low6, (w[2] & low4) | (((w[0] >> 6) & low2) << 4),
                             w[1] & low6, ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4)};
  std::memcpy(sc, words, 8);
  std::memcpy(m, words + 2, 8);
}

template <TensorType kType>
FFNSKIP_TARGET_AVX2 inline void k_scales_avx2(const typename Format<kType>::BlockType& b,
                                              KScales& k) {
  k.d = fp16_avx2(b.d);
  if constexpr (kType == TensorType::Q6_K) {
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales));
    _mm_store_si128(reinterpret_cast<__m128i*>(k.mul6), scales);
    _mm256_store_si256(reinterpret_cast<__m256i*>(k.mul16), _mm256_cvtepi8_epi16(scales));
  } else {
    k.dmin = fp16_avx2(b.dmin);
    uint8_t sc[8], m[8];
    k4_scale_bytes(b.scales, sc, m);
    _mm_store_si128(reinterpret_cast<__m128i*>(k.mul),
                    _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))));
    _mm_store_si128(reinterpret_cast<__m128i*>(k.mins),
                    _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m))));
  }
}

// The vpmaddwd weights of sub-block group g: its scale on both halves (Q4_K/Q5_K), or the
// scales of its two sub-blocks of 16 on the low and high halves (Q6_K).
template <TensorType kType>
FFNSKIP_TARGET_AVX2 inline __m256i k_mul(const KScales& k, int g) {
  if constexpr (kType != TensorType::Q6_K) return _mm256_set1_epi16(k.mul[g]);
  alignas(16) static const uint8_t kPairs[8][16] = {
      {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
      {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
      {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
      {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
      {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
      {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
      {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
      {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};
  return _mm256_cvtepi8_epi16(
      _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k.mul6)),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(kPairs[g]))));
}

FFNSKIP_TARGET_AVX2 inline __m256i dot_pairs_avx2(__m256i q, __m256i x, bool is_signed) {
  // vpmaddubsw multiplies unsigned by signed bytes: a signed q lends its sign to x.
  return is_signed ? _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q))
                   : _mm256_maddubs_epi16(q, x);
}

// A decode step streams each weight once and computes little per byte: each row is fetched
// about 4 KiB ahead, so that the loads of later blocks overlap this one's arithmetic.
template <typename Block>
FFNSKIP_TARGET_AVX2 inline void prefetch_ahead(const Block* row, int64_t b) {
  constexpr int64_t kAhead = (4096 + sizeof(Block) - 1) / sizeof(Block);
  constexpr int64_t kEvery = sizeof(Block) >= 64 ? 1 : 64 / sizeof(Block);  // once a line
  if (b % kEvery != 0) return;
  for (size_t line = 0; line < sizeof(Block); line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row + b + kAhead) + line, _MM_HINT_T0);
  }
}

template <int R, int T>
FFNSKIP_TARGET_AVX2 inline void store_tile(__m256 (&acc)[R][T], float* y, int64_t y_stride,
                                           int64_t row, bool accumulate) {
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      const float v = hsum_avx2(acc[r][t]);
      float& dst = y[t * y_stride + row + r];
      dst = accumulate ? dst + v : v;
    }
  }
}

// Where a tile reads its weights. Decode uses each weight once, so it unpacks the stored
// blocks as it goes (StoredRows); prefill unpacks a panel of rows once per block of tokens
// and every tile of those tokens reads the integers ready for vpmaddubsw (PanelRows).
template <TensorType kType>
struct StoredRows {
  using Block = typename Format<kType>::BlockType;
  const Block* first;  // the tile's first row
  int64_t blocks;      // per row

  const Block& block(int r, int64_t b) const { return first[r * blocks + b]; }
  FFNSKIP_TARGET_AVX2 void prefetch(int r, int64_t b) const {
    prefetch_ahead(first + r * blocks, b);
  }
  FFNSKIP_TARGET_AVX2 __m256i q(int r, int64_t b, int g) const {
    return unpack_avx2<kType>(block(r, b), g);
  }
  FFNSKIP_TARGET_AVX2 void scales(int r, int64_t b, float& factor, float& minimum) const {
    block_scales_avx2<kType>(block(r, b), factor, minimum);
  }
  FFNSKIP_TARGET_AVX2 void k_scales(int r, int64_t b, KScales& k) const {
    k_scales_avx2<kType>(block(r, b), k);
  }
};

// Rows unpacked: per row and block, its groups of 32 integers and its scales.
struct alignas(32) Group32 {
  uint8_t q[32];
};
struct Panel {
  std::vector<Group32> q;     // [row][block][group]
  std::vector<KScales> k;     // K-quants: [row][block]
  std::vector<float> factor;  // 32-element formats: [row][block]
  std::vector<float> minimum;
};

template <TensorType kType>
struct PanelRows {
  static constexpr int kGroups = Format<kType>::kGroups;
  const Group32* q_;  // from the tile's first row on
  const KScales* k_;
  const float* factor_;
  const float* minimum_;
  int64_t blocks;  // per row

  PanelRows(const Panel& panel, int64_t blocks_per_row, int first_row)
      : q_(panel.q.data() + first_row * blocks_per_row * kGroups),
        k_(panel.k.data() + (kGroups == 8 ? first_row * blocks_per_row : 0)),
        factor_(panel.factor.data() + (kGroups == 1 ? first_row * blocks_per_row : 0)),
        minimum_(panel.minimum.data() + (kGroups == 1 ? first_row * blocks_per_row : 0)),
        blocks(blocks_per_row) {}

  void prefetch(int, int64_t) const {}
  FFNSKIP_TARGET_AVX2 __m256i q(int r, int64_t b, int g) const {
    return _mm256_load_si256(
        reinterpret_cast<const __m256i*>(q_[(r * blocks + b) * kGroups + g].q));
  }
  void scales(int r, int64_t b, float& factor, float& minimum) const {
    factor = factor_[r * blocks + b];
    minimum = minimum_[r * blocks + b];
  }
  void k_scales(int r, int64_t b, KScales& k) const { k = k_[r * blocks + b]; }
};

// Rows [row, row + rows) of w into `panel`, once for all the tokens of a block.
template <TensorType kType>
FFNSKIP_TARGET_AVX2 void unpack_panel(const QuantMatrix& w, int64_t row, int rows,
                                      Panel& panel) {
  constexpr int kGroups = Format<kType>::kGroups;
  const int64_t blocks = w.in / block_elements(kType);
  const StoredRows<kType> stored{
      static_cast<const typename Format<kType>::BlockType*>(w.data) + row * blocks, blocks};
  const int64_t n = rows * blocks;
  panel.q.resize(n * kGroups);
  if constexpr (kGroups == 8) {
    panel.k.resize(n);
  } else {
    panel.factor.resize(n);
    panel.minimum.resize(n);
  }
  for (int r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t at = r * blocks + b;
      for (int g = 0; g < kGroups; ++g) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(panel.q[at * kGroups + g].q),
                           stored.q(r, b, g));
      }
      if constexpr (kGroups == 8) {
        stored.k_scales(r, b, panel.k[at]);
      } else {
        stored.scales(r, b, panel.factor[at], panel.minimum[at]);
      }
    }
  }
}

// 32-element formats, R weight rows times T tokens: each block of weights is unpacked once for
// the T tokens; the minimum terms go into lanes 0 and 1 of the accumulators.
template <TensorType kType, int R, int T, typename Rows>
FFNSKIP_TARGET_AVX2 void tile32_avx2(const Rows& w, int64_t blocks, const BlockQ8* xq,
                                     float* y, int64_t y_stride, int64_t row, bool accumulate) {
  using F = Format<kType>;
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i q[R];
    float factor[R], minimum[R];
    for (int r = 0; r < R; ++r) {
      if constexpr (T == 1) w.prefetch(r, b);
      q[r] = w.q(r, b, 0);
      w.scales(r, b, factor[r], minimum[r]);
    }
    for (int t = 0; t < T; ++t) {
      const BlockQ8& x = xq[t * blocks + b];
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q));
      const __m256 xd = _mm256_broadcast_ss(&x.d);
      [[maybe_unused]] __m256i x_offset;  // offset * x in pair sums, shared by the rows
      if constexpr (kIntegerOffset<kType> != 0) {
        x_offset = _mm256_maddubs_epi16(_mm256_set1_epi8(kIntegerOffset<kType>), xv);
      }
      for (int r = 0; r < R; ++r) {
        __m256i pairs = dot_pairs_avx2(q[r], xv, F::kSigned);
        if constexpr (kIntegerOffset<kType> != 0) pairs = _mm256_sub_epi16(pairs, x_offset);
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[r][t] = _mm256_fmadd_ps(sums, _mm256_mul_ps(xd, _mm256_set1_ps(factor[r])),
                                    acc[r][t]);
        if constexpr (kHasMinimum<kType>) {
          const __m256 xs = _mm256_castps128_ps256(_mm_castsi128_ps(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x.s))));
          acc[r][t] = _mm256_fmadd_ps(xs, _mm256_set1_ps(minimum[r]), acc[r][t]);
        }
      }
    }
  }
  store_tile<R, T>(acc, y, y_stride, row, accumulate);
}

// K-quants, R rows times T tokens: the eight sub-blocks of a super-block summed in int32 with
// their integer scales (vpmaddwd), converted once; Q6_K's -32 subtracted once per super-block
// from the integer sums (its scales dotted with the activations' sums per 16), Q4_K/Q5_K's
// minimums dotted with the activations' sums per 32.
template <TensorType kType, int R, int T, typename Rows>
FFNSKIP_TARGET_AVX2 void tile_k_avx2(const Rows& w, int64_t blocks, const BlockQ8K* xk,
                                     float* y, int64_t y_stride, int64_t row, bool accumulate) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    KScales ks[R];
    for (int r = 0; r < R; ++r) {
      if constexpr (T == 1) w.prefetch(r, b);
      w.k_scales(r, b, ks[r]);
    }
    __m256i isum[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) isum[r][t] = _mm256_setzero_si256();
    }
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      __m256i q[R], mul[R];
      for (int r = 0; r < R; ++r) {
        q[r] = w.q(r, b, g);
        mul[r] = k_mul<kType>(ks[r], g);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(xk[t * blocks + b].q + 32 * g));
        for (int r = 0; r < R; ++r) {
          isum[r][t] = _mm256_add_epi32(
              isum[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], xv), mul[r]));
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const BlockQ8K& x = xk[t * blocks + b];
      [[maybe_unused]] __m128i sums;
      [[maybe_unused]] __m256i sums16;
      if constexpr (kType != TensorType::Q6_K) {
        sums = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.sums));
      } else {
        sums16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.sums16));
      }
      for (int r = 0; r < R; ++r) {
        if constexpr (kType == TensorType::Q6_K) {  // - 32 * sum_j sc_j * sums16_j
          const __m256i offset = _mm256_madd_epi16(
              _mm256_load_si256(reinterpret_cast<const __m256i*>(ks[r].mul16)), sums16);
          isum[r][t] = _mm256_sub_epi32(isum[r][t], _mm256_slli_epi32(offset, 5));
        }
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][t]),
                                    _mm256_set1_ps(ks[r].d * x.d), acc[r][t]);
        if constexpr (kType != TensorType::Q6_K) {
          // sum_g m_g * sums_g in four int32 lanes, times -dmin * d_x, into the low lanes.
          const __m128i m = _mm_madd_epi16(
              _mm_load_si128(reinterpret_cast<const __m128i*>(ks[r].mins)), sums);
          acc[r][t] = _mm256_fmadd_ps(_mm256_castps128_ps256(_mm_cvtepi32_ps(m)),
                                      _mm256_set1_ps(-ks[r].dmin * x.d), acc[r][t]);
        }
      }
    }
  }
  store_tile<R, T>(acc, y, y_stride, row, accumulate);
}

// Blocks of `size` floats (32 or 256) into their int8 block, as the plain loop below: the same
// rounding (to nearest, ties to even: vcvtps2dq in the default MXCSR mode).
template <int kSize>
FFNSKIP_TARGET_AVX2 inline float quantize_block_avx2(const float* x, int8_t* q,
                                                     int32_t* sums32) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < kSize; i += 8) {
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float max_abs = _mm_cvtss_f32(m);
  const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? 127.0f / max_abs : 0.0f);
  for (int j = 0; j < kSize; j += 32) {
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * i), inv));
    }
    // Pack 32 int32 to int8 in order (the packs interleave 128-bit lanes: permute back).
    __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                    _mm256_packs_epi32(v[2], v[3]));
    q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), q8);
    // The sums of the halves of 16: v[0], v[1] and v[2], v[3].
    const __m256i halves = _mm256_hadd_epi32(_mm256_add_epi32(v[0], v[1]),
                                             _mm256_add_epi32(v[2], v[3]));
    const __m128i folded = _mm_add_epi32(_mm256_castsi256_si128(halves),
                                         _mm256_extracti128_si256(halves, 1));
    const __m128i pairs = _mm_hadd_epi32(folded, folded);  // [lo, hi, lo, hi]
    sums32[2 * (j / 32)] = _mm_cvtsi128_si32(pairs);
    sums32[2 * (j / 32) + 1] = _mm_extract_epi32(pairs, 1);
  }
  return max_abs / 127.0f;
}

FFNSKIP_TARGET_AVX2 void quantize_avx2(const float* x, int64_t blocks, BlockQ8* out) {
  for (int64_t b = 0; b < blocks; ++b, x += 32, ++out) {
    int32_t sums[2];
    out->d = quantize_block_avx2<32>(x, out->q, sums);
    out->s[0] = out->d * static_cast<float>(sums[0]);
    out->s[1] = out->d * static_cast<float>(sums[1]);
  }
}

FFNSKIP_TARGET_AVX2 void quantize_avx2(const float* x, int64_t blocks, BlockQ8K* out) {
  for (int64_t b = 0; b < blocks; ++b, x += 256, ++out) {
    int32_t sums[16];
    out->d = quantize_block_avx2<256>(x, out->q, sums);
    for (int g = 0; g < 8; ++g) out->sums[g] = static_cast<int16_t>(sums[2 * g] + sums[2 * g + 1]);
    for (int j = 0; j < 16; ++j) out->sums16[j] = static_cast<int16_t>(sums[j]);
  }
}

// tile(std::integral_constant<int, width>) for the width in 1 .. kMax (nothing for 0).
template <int kMax, typename Tile>
inline void tile_of_width(int width, Tile&& tile) {
  if constexpr (kMax >= 1) {
    if (width == kMax) {
      tile(std::integral_constant<int, kMax>{});
    } else {
      tile_of_width<kMax - 1>(width, tile);
    }
  }
}

// Tokens in blocks whose activations stay in L2 while the rows stream past; within a block,
// tiles of several rows and tokens, and of one token for the rest (and for decode).
constexpr int64_t kTokenBlock = 64;

template <TensorType kType, int R, int T, typename Rows, typename X>
FFNSKIP_TARGET_AVX2 inline void tile_avx2(const Rows& w, int64_t blocks, const X* x, float* y,
                                          int64_t y_stride, int64_t row, bool accumulate) {
  if constexpr (is_k_quant(kType)) {
    tile_k_avx2<kType, R, T>(w, blocks, x, y, y_stride, row, accumulate);
  } else {
    tile32_avx2<kType, R, T>(w, blocks, x, y, y_stride, row, accumulate);
  }
}

template <TensorType kType>
FFNSKIP_TARGET_AVX2 void rows_avx2(const QuantMatrix& w, const QuantInput& input, float* y,
                                   int64_t y_stride, int64_t row_begin, int64_t row_end,
                                   bool accumulate) {
  // Many tokens (prefill): panels of kPanelRows rows unpacked once per token block, then tiles
  // of kPanelRows rows x 4 tokens (the K-quants, whose int32 sums double the accumulators: 1
  // row). 2 .. kStepExactTokens tokens (a speculative verification): each weight row straight
  // from its stored blocks, which stay in L1 for the next tokens, in tiles of 8 tokens and one
  // of the rest: a one-token tile costs nearly a decode step even from L1 (Qwen2.5-1.5B
  // Q4_K_M: 2 tokens as two one-token tiles 1.7 steps, as one tile 1.35; 8 tokens in 4-token
  // tiles 3.7 steps, in one tile 2.5; prefill kept its panels: 8-token tiles were slower).
  // One token: rows one at a time, each a single stream from memory ahead of which
  // prefetch_ahead reads, except that the small blocks of the 4- and 5-bit formats go two
  // rows at a time (more independent work per block; measured: bench_kernels.py).
  // Each token's sums run in the same order whatever the tile: results do not depend on it.
  constexpr int kPanelRows = is_k_quant(kType) ? 1 : 2;
  using PanelRowsTile = std::integral_constant<int, kPanelRows>;
  using PanelTokens = std::integral_constant<int, 4>;
  using VerifyTokens = std::integral_constant<int, 8>;
  using OneRow = std::integral_constant<int, 1>;
  constexpr int kDecodeRows = is_k_quant(kType) || kType == TensorType::Q8_0 ? 1 : 2;
  using Block = typename Format<kType>::BlockType;
  const auto* x = [&] {
    if constexpr (is_k_quant(kType)) return input.x256; else return input.x32;
  }();
  const int64_t blocks = w.in / block_elements(kType);
  const auto* rows = static_cast<const Block*>(w.data);
  const int64_t n = input.n;
  thread_local Panel panel;
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t t_end = std::min(n, t0 + kTokenBlock);
    // The tokens [t0, t_end) over `rows_tile` rows from `row` read through `w_rows`: tiles of
    // `width` tokens, then one tile of the rest.
    auto token_tiles = [&](const auto& w_rows, int64_t row, auto rows_tile, auto width) {
      auto tile = [&](auto tokens, int64_t t) {
        tile_avx2<kType, decltype(rows_tile)::value, decltype(tokens)::value>(
            w_rows, blocks, x + t * blocks, y + t * y_stride, y_stride, row, accumulate);
      };
      constexpr int kWidth = decltype(width)::value;
      const int64_t tiled = t0 + (t_end - t0) / kWidth * kWidth;
      for (int64_t t = t0; t < tiled; t += kWidth) tile(width, t);
      tile_of_width<kWidth - 1>(static_cast<int>(t_end - tiled),
                                [&](auto tokens) { tile(tokens, tiled); });
    };
    if (t_end - t0 > 1 && t_end - t0 <= kStepExactTokens) {
      for (int64_t row = row_begin; row < row_end; ++row) {
        token_tiles(StoredRows<kType>{rows + row * blocks, blocks}, row, OneRow{},
                    VerifyTokens{});
      }
    } else if (t_end - t0 > 1) {
      for (int64_t row = row_begin; row < row_end; row += kPanelRows) {
        const int panel_rows = static_cast<int>(std::min<int64_t>(kPanelRows, row_end - row));
        unpack_panel<kType>(w, row, panel_rows, panel);
        if (panel_rows == kPanelRows) {
          token_tiles(PanelRows<kType>(panel, blocks, 0), row, PanelRowsTile{}, PanelTokens{});
          continue;
        }
        for (int r = 0; r < panel_rows; ++r) {
          token_tiles(PanelRows<kType>(panel, blocks, r), row + r, OneRow{}, PanelTokens{});
        }
      }
    }
    for (int64_t t = t0; t < t_end && t_end - t0 == 1; ++t) {  // one token (decode)
      int64_t r = row_begin;
      for (; r + kDecodeRows <= row_end; r += kDecodeRows) {
        tile_avx2<kType, kDecodeRows, 1>(StoredRows<kType>{rows + r * blocks, blocks}, blocks,
                                         x + t * blocks, y + t * y_stride, y_stride, r,
                                         accumulate);
      }
      for (; r < row_end; ++r) {
        tile_avx2<kType, 1, 1>(StoredRows<kType>{rows + r * blocks, blocks}, blocks,
                               x + t * blocks, y + t * y_stride, y_stride, r, accumulate);
      }
    }
  }
}
#endif

template <TensorType kType>
void rows_of_type(const QuantMatrix& w, const QuantInput& x, float* y, int64_t y_stride,
                  int64_t row_begin, int64_t row_end, bool accumulate, Isa isa) {
#ifdef FFNSKIP_X86_DISPATCH
  if (isa != Isa::Default) {
    rows_avx2<kType>(w, x, y, y_stride, row_begin, row_end, accumulate);
    return;
  }
#endif
  (void)isa;
  rows_scalar<kType>(w, x, y, y_stride, row_begin, row_end, accumulate);
}

// A block of `size` activations as the SIMD path quantises them.
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

}  // namespace

bool uses_k_activations(TensorType type) { return is_k_quant(type); }

void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8* out, Isa isa) {
  const int64_t blocks = n * in / 32;
#ifdef FFNSKIP_X86_DISPATCH
  if (isa != Isa::Default) return quantize_avx2(x, blocks, out);
#endif
  (void)isa;
  for (int64_t b = 0; b < blocks; ++b, x += 32, ++out) {
    int32_t sums[2];
    out->d = quantize_block_scalar<32>(x, out->q, sums);
    out->s[0] = out->d * static_cast<float>(sums[0]);
    out->s[1] = out->d * static_cast<float>(sums[1]);
  }
}

void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8K* out, Isa isa) {
  const int64_t blocks = n * in / 256;
#ifdef FFNSKIP_X86_DISPATCH
  if (isa != Isa::Default) return quantize_avx2(x, blocks, out);
#endif
  (void)isa;
  for (int64_t b = 0; b < blocks; ++b, x += 256, ++out) {
    int32_t sums[16];
    out->d = quantize_block_scalar<256>(x, out->q, sums);
    for (int g = 0; g < 8; ++g) out->sums[g] = static_cast<int16_t>(sums[2 * g] + sums[2 * g + 1]);
    for (int j = 0; j < 16; ++j) out->sums16[j] = static_cast<int16_t>(sums[j]);
  }
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
