#include "linear.h"

#include <algorithm>
#include <vector>

#include "../core/half.h"
#include "../core/tensor_types.h"
#include "quant.h"
#include "simd.h"

#ifdef FFNSKIP_X86_DISPATCH
#include <immintrin.h>
#endif

namespace ffnskip::cpu {

namespace {

// Tokens whose inputs stay cache-resident (L2) while a slice of weight rows streams past them.
constexpr int64_t kTokenBlock = 64;
// The many-token register tile: kTileRows weight rows times kTileTokens tokens.
constexpr int kTileRows = 4;
constexpr int kTileTokens = 4;

typedef uint16_t vu16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vu32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// One float matrix of a linear's part, as the float kernels read it: its rows [row, ...) write
// y[t * out + row]; `out` is the whole linear's row count (the y stride), `bias` the part's.
struct Matrix {
  const void* weight;
  const float* bias;
  int64_t out;
  int64_t in;
};

// How a storage type widens to fp32. A block of kParts * kLanes weights becomes kParts
// vectors, each multiplied by the vector of x at the same offset in the block; `at` widens one
// weight of the scalar tail (x is in its natural order there).
struct F32Weights {
  using Stored = float;
  static constexpr int kParts = 1;
  __attribute__((always_inline)) static void widen(const float* p, vfloat* out) {
    out[0] = load(p);
  }
  static float at(const float* p) { return *p; }
};

// 32 bf16 weights read as 16 u32 lanes hold the even-indexed weights in their low halves and
// the odd ones in their high halves, so a shift and a mask widen them (the usual zero-extend
// and shift take a cross-lane shuffle per 16). x is stored de-interleaved to match: the 16
// even elements of each block of 32, then the 16 odd ones. Activations stay fp32.
struct BF16Weights {
  using Stored = uint16_t;
  static constexpr int kParts = 2;
  __attribute__((always_inline)) static void widen(const uint16_t* p, vfloat* out) {
    vu32 pairs;
    std::memcpy(&pairs, p, sizeof(pairs));
    out[0] = bits_as<vfloat>(pairs << 16);
    out[1] = bits_as<vfloat>(pairs & 0xFFFF0000u);
  }
  static float at(const uint16_t* p) { return bf16_to_float(*p); }
};

#ifdef FFNSKIP_X86_DISPATCH
// F16C conversions. Not always_inline: the intrinsics may only be inlined into code compiled
// for their target, which the kernel templates are not until they are inlined into a
// per-instruction-set entry point; `flatten` there inlines these.
FFNSKIP_TARGET_AVX512 inline vfloat widen_f16_avx512(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return bits_as<vfloat>(_mm512_maskz_cvtph_ps(0xFFFF, h));  // maskz: no -Wmaybe-uninitialized
}

// One float broadcast to every lane straight from memory (a generic-vector splat costs an add
// or a lane-by-lane build in GCC's code for this target).
FFNSKIP_TARGET_AVX512 inline vfloat broadcast_avx512(const float* p) {
  return bits_as<vfloat>(_mm512_set1_ps(*p));
}

FFNSKIP_TARGET_AVX2 inline vfloat widen_f16_avx2(const uint16_t* p) {
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  vfloat v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
}
#endif

template <Isa I>
struct F16Weights {
  using Stored = uint16_t;
  static constexpr int kParts = 1;
  __attribute__((always_inline)) static void widen(const uint16_t* p, vfloat* out) {
#ifdef FFNSKIP_X86_DISPATCH
    if constexpr (I == Isa::Avx512) {
      out[0] = widen_f16_avx512(p);
      return;
    } else if constexpr (I == Isa::Avx2) {
      out[0] = widen_f16_avx2(p);
      return;
    }
#endif
    vu16 h;
    std::memcpy(&h, p, sizeof(h));
    out[0] = widen_f16<vfloat>(__builtin_convertvector(h, vu32));
  }
  static float at(const uint16_t* p) { return f16_to_float(*p); }
};

// R weight rows times T tokens: R*T accumulators, each weight block widened once per T tokens.
template <int R, int T, typename W>
__attribute__((always_inline)) inline void tile(const Matrix& w, int64_t row,
                                                const float* x, float* y, bool accumulate) {
  constexpr int P = W::kParts;
  constexpr int64_t kBlock = P * kLanes;
  const int64_t in = w.in;
  const typename W::Stored* wr = static_cast<const typename W::Stored*>(w.weight) + row * in;
  vfloat acc[R][T] = {};
  int64_t i = 0;
  for (; i + kBlock <= in; i += kBlock) {
    vfloat xv[T][P];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) xv[t][p] = load(x + t * in + i + p * kLanes);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // A decode step reads each weight once, and the hardware prefetcher starts over at each
      // tile (a bf16 row of 576 is 18 cache lines): fetch the next tile's rows meanwhile.
      if constexpr (T == 1) __builtin_prefetch(wr + (r + R) * in + i);
      vfloat wv[P];
      W::widen(wr + r * in + i, wv);
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[r][t] += wv[p] * xv[t][p];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = w.bias ? w.bias[row + r] : 0.0f;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      float s = reduce_add(acc[r][t]);
      for (int64_t j = i; j < in; ++j) s += W::at(wr + r * in + j) * x[t * in + j];
      float& dst = y[t * w.out + row + r];
      dst = accumulate ? dst + (s + b) : s + b;
    }
  }
}

// Every row of [row_begin, row_end) for one token, R rows at a time.
template <int R, typename W>
__attribute__((always_inline)) inline void rows_for_token(const Matrix& w,
                                                          int64_t row_begin, int64_t row_end,
                                                          const float* x, float* y,
                                                          bool accumulate) {
  int64_t row = row_begin;
  for (; row + R <= row_end; row += R) tile<R, 1, W>(w, row, x, y, accumulate);
  for (; row < row_end; ++row) tile<1, 1, W>(w, row, x, y, accumulate);
}

// Within a block of tokens, each tile of weight rows stays in L1 while every group of
// kTileTokens tokens (their inputs in L2) passes it: the rows come from memory once per block.
template <typename W>
__attribute__((always_inline)) inline void token_blocks(const Matrix& w, const float* x,
                                                        int64_t n, float* y, int64_t row_begin,
                                                        int64_t row_end, bool accumulate) {
  constexpr int R = kTileRows, T = kTileTokens;
  const int64_t in = w.in, out = w.out;
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t t_end = std::min(n, t0 + kTokenBlock);
    const int64_t t_tiled = t0 + (t_end - t0) / T * T;
    int64_t row = row_begin;
    for (; row + R <= row_end; row += R) {
      for (int64_t t = t0; t < t_tiled; t += T) {
        tile<R, T, W>(w, row, x + t * in, y + t * out, accumulate);
      }
    }
    for (; row < row_end; ++row) {
      for (int64_t t = t0; t < t_tiled; t += T) {
        tile<1, T, W>(w, row, x + t * in, y + t * out, accumulate);
      }
    }
    for (int64_t t = t_tiled; t < t_end; ++t) {  // one token (decode), or a block's last few
      rows_for_token<8, W>(w, row_begin, row_end, x + t * in, y + t * out, accumulate);
    }
  }
}

// The AVX-512 outer-product kernel's tile (below): kPanelRows weight rows x kPanelTokens tokens.
constexpr int kPanelRows = 2 * kLanes;
constexpr int kPanelTokens = 12;

// The inputs of a linear in the layouts its kernels read.
struct LinearInput {
  const float* x;   // [n, in], natural order
  const float* xs;  // x, or for bf16 weights each block of 32 de-interleaved (BF16Weights)
  const float* xt;  // the panel path's token groups, [n / kPanelTokens][in][kPanelTokens]; or
                    // null where that path is not taken
  QuantInput xq;     // for quantised weights, in the formats they read
  int64_t n;
};

#ifdef FFNSKIP_X86_DISPATCH
// Many tokens with AVX-512 (one vfloat per register): y[t, rows] as outer products. A panel of
// kPanelRows weight rows is transposed and widened to fp32 once, [in][kPanelRows], then every
// group of kPanelTokens tokens broadcasts its inputs against it: two panel loads per 24 FMAs
// and no horizontal sums, where the dot-product tiles above need both.

template <typename W>
__attribute__((always_inline)) inline void pack_panel(const Matrix& w, int64_t row,
                                                      float* panel) {
  const typename W::Stored* src = static_cast<const typename W::Stored*>(w.weight) + row * w.in;
  for (int64_t k = 0; k < w.in; ++k) {
    for (int r = 0; r < kPanelRows; ++r) panel[k * kPanelRows + r] = W::at(src + r * w.in + k);
  }
}

// T tokens' outputs for one panel; token t's input k is x[t * t_stride + k * k_stride].
template <int T>
__attribute__((always_inline)) inline void panel_tokens(const Matrix& w, int64_t row,
                                                        const float* panel, const float* x,
                                                        int64_t t_stride, int64_t k_stride,
                                                        float* y, bool accumulate) {
  vfloat acc[T][2] = {};
  for (int64_t k = 0; k < w.in; ++k) {
    const vfloat p0 = load(panel + k * kPanelRows);
    const vfloat p1 = load(panel + k * kPanelRows + kLanes);
#pragma GCC unroll 12
    for (int t = 0; t < T; ++t) {
      const vfloat xv = broadcast_avx512(x + t * t_stride + k * k_stride);
      acc[t][0] += xv * p0;
      acc[t][1] += xv * p1;
    }
  }
  const vfloat b0 = w.bias ? load(w.bias + row) : vfloat{};
  const vfloat b1 = w.bias ? load(w.bias + row + kLanes) : vfloat{};
#pragma GCC unroll 12
  for (int t = 0; t < T; ++t) {
    float* dst = y + t * w.out + row;
    store(dst, accumulate ? load(dst) + (acc[t][0] + b0) : acc[t][0] + b0);
    store(dst + kLanes, accumulate ? load(dst + kLanes) + (acc[t][1] + b1) : acc[t][1] + b1);
  }
}

// Rows [row_begin, row_end) in whole panels; returns the first row it left (fewer than
// kPanelRows remain).
template <typename W>
__attribute__((always_inline)) inline int64_t panel_rows(const Matrix& w,
                                                         const LinearInput& input, float* y,
                                                         int64_t row_begin, int64_t row_end,
                                                         bool accumulate) {
  thread_local std::vector<float> panel;  // grows to the widest input, then never allocates
  panel.resize(static_cast<size_t>(w.in * kPanelRows));
  const int64_t in = w.in, out = w.out, n = input.n;
  const int64_t grouped = n / kPanelTokens * kPanelTokens;
  int64_t row = row_begin;
  for (; row + kPanelRows <= row_end; row += kPanelRows) {
    pack_panel<W>(w, row, panel.data());
    for (int64_t t = 0; t < grouped; t += kPanelTokens) {
      panel_tokens<kPanelTokens>(w, row, panel.data(), input.xt + t * in, 1, kPanelTokens,
                                 y + t * out, accumulate);
    }
    for (int64_t t = grouped; t < n; ++t) {
      panel_tokens<1>(w, row, panel.data(), input.x + t * in, in, 1, y + t * out, accumulate);
    }
  }
  return row;
}

#endif

template <Isa I, typename W>
__attribute__((always_inline)) inline void rows_of_type(const Matrix& w,
                                                        const LinearInput& input, float* y,
                                                        int64_t row_begin, int64_t row_end,
                                                        bool accumulate) {
#ifdef FFNSKIP_X86_DISPATCH
  if constexpr (I == Isa::Avx512) {
    if (input.xt) row_begin = panel_rows<W>(w, input, y, row_begin, row_end, accumulate);
  }
#endif
  token_blocks<W>(w, input.xs, input.n, y, row_begin, row_end, accumulate);
}

template <Isa I>
__attribute__((always_inline)) inline void float_rows(const Matrix& w, TensorType type,
                                                      const LinearInput& input, float* y,
                                                      int64_t row_begin, int64_t row_end,
                                                      bool accumulate) {
  switch (type) {
    case TensorType::F32:
      rows_of_type<I, F32Weights>(w, input, y, row_begin, row_end, accumulate);
      break;
    case TensorType::BF16:
      rows_of_type<I, BF16Weights>(w, input, y, row_begin, row_end, accumulate);
      break;
    case TensorType::F16:
      rows_of_type<I, F16Weights<I>>(w, input, y, row_begin, row_end, accumulate);
      break;
    default:
      break;  // quantised: quant_rows
  }
}

FFNSKIP_ISA_VARIANTS(void, float_rows,
                     (const Matrix& w, TensorType type, const LinearInput& input, float* y,
                      int64_t row_begin, int64_t row_end, bool accumulate),
                     (w, type, input, y, row_begin, row_end, accumulate))

// The exported dot and axpy, in the instruction set of the other kernels.
template <Isa>
__attribute__((always_inline)) inline float dot_any(const float* a, const float* b,
                                                    int64_t len) {
  return dot_kernel(a, b, len);
}
FFNSKIP_ISA_VARIANTS(float, dot_any, (const float* a, const float* b, int64_t len), (a, b, len))

template <Isa>
__attribute__((always_inline)) inline void axpy_any(float a, const float* x, float* y,
                                                    int64_t len) {
  axpy_kernel(a, x, y, len);
}
FFNSKIP_ISA_VARIANTS(void, axpy_any, (float a, const float* x, float* y, int64_t len),
                     (a, x, y, len))

// x with each full block of 32 elements de-interleaved for BF16Weights; the tail as it is.
const float* deinterleave_pairs(const float* x, int64_t n, int64_t in) {
  constexpr int64_t kBlock = 2 * kLanes;
  thread_local std::vector<float> out;  // grows to the largest input, then never allocates
  out.resize(static_cast<size_t>(n * in));
  for (int64_t t = 0; t < n; ++t) {
    const float* src = x + t * in;
    float* dst = out.data() + t * in;
    int64_t i = 0;
    for (; i + kBlock <= in; i += kBlock) {
      for (int64_t j = 0; j < kLanes; ++j) {
        dst[i + j] = src[i + 2 * j];
        dst[i + kLanes + j] = src[i + 2 * j + 1];
      }
    }
    std::copy(src + i, src + in, dst + i);
  }
  return out.data();
}

// x's whole groups of kPanelTokens tokens, each transposed to [in][kPanelTokens] (the panel
// kernel's broadcasts then read consecutive floats).
const float* token_groups(const float* x, int64_t n, int64_t in) {
  thread_local std::vector<float> out;  // grows to the largest input, then never allocates
  const int64_t groups = n / kPanelTokens;
  out.resize(static_cast<size_t>(groups * kPanelTokens * in));
  for (int64_t g = 0; g < groups; ++g) {
    const float* src = x + g * kPanelTokens * in;
    float* dst = out.data() + g * kPanelTokens * in;
    for (int64_t k = 0; k < in; ++k) {
      for (int t = 0; t < kPanelTokens; ++t) dst[k * kPanelTokens + t] = src[t * in + k];
    }
  }
  return out.data();
}

bool is_float(TensorType type) { return !is_quantized(type); }

// Rows [row_begin, row_end) of the whole linear: each part's share by its own kernel.
void linear_rows(const LinearWeights& w, const LinearInput& input, float* y, int64_t row_begin,
                 int64_t row_end, bool accumulate, Isa isa) {
  const auto float_kernel = float_rows_for_isa(isa);
  int64_t first = 0;  // the part's first row in the linear
  for (int p = 0; p < w.num_parts; first += w.parts[p].rows, ++p) {
    const LinearWeights::Part& part = w.parts[p];
    const int64_t begin = std::max(row_begin, first), end = std::min(row_end, first + part.rows);
    if (begin >= end) continue;
    if (is_float(part.type)) {
      const Matrix m{part.data, w.bias ? w.bias + first : nullptr, w.out, w.in};
      float_kernel(m, part.type, input, y + first, begin - first, end - first, accumulate);
      continue;
    }
    const QuantMatrix m{part.data, part.type, w.in};
    quant_rows(m, input.xq, y + first, w.out, begin - first, end - first, accumulate, isa);
    if (w.bias == nullptr) continue;
    for (int64_t t = 0; t < input.n; ++t) {
      for (int64_t r = begin; r < end; ++r) y[t * w.out + r] += w.bias[r];
    }
  }
}

// x quantised for the integer kernels of w's parts: per 32 and/or per 256.
QuantInput quantized_activations(const LinearWeights& w, const float* x, int64_t n, Isa isa) {
  // Per calling thread; they grow to the largest input, then never allocate.
  thread_local std::vector<BlockQ8> x32;
  thread_local std::vector<BlockQ8K> x256;
  QuantInput q;
  q.n = n;
  if (w.any_of([](TensorType t) { return is_quantized(t) && !uses_k_activations(t); })) {
    x32.resize(static_cast<size_t>(n * w.in / 32));
    quantize_activations(x, n, w.in, x32.data(), isa);
    q.x32 = x32.data();
  }
  if (w.any_of(uses_k_activations)) {
    x256.resize(static_cast<size_t>(n * w.in / 256));
    quantize_activations(x, n, w.in, x256.data(), isa);
    q.x256 = x256.data();
  }
  return q;
}

}  // namespace

LinearWeights::LinearWeights(std::initializer_list<Part> list, int64_t in_features,
                             const float* bias_values)
    : bias(bias_values), in(in_features) {
  for (const Part& p : list) {
    parts[num_parts++] = p;
    out += p.rows;
  }
}

LinearWeights LinearWeights::slice(int first, int count) const {
  LinearWeights part;
  int64_t skipped = 0;
  for (int p = 0; p < first; ++p) skipped += parts[p].rows;
  for (int p = first; p < first + count; ++p) {
    part.parts[part.num_parts++] = parts[p];
    part.out += parts[p].rows;
  }
  part.bias = bias ? bias + skipped : nullptr;
  part.in = in;
  return part;
}

bool LinearWeights::any_of(bool (*predicate)(TensorType)) const {
  return std::any_of(parts, parts + num_parts, [&](const Part& p) { return predicate(p.type); });
}

void linear(ThreadPool& pool, const LinearWeights& w, const float* x, int64_t n, float* y,
            Output mode, Isa isa) {
  const bool accumulate = mode == Output::Accumulate;
  LinearInput input{x, x, nullptr, {}, n};
  if (w.any_of([](TensorType t) { return t == TensorType::BF16; })) {
    input.xs = deinterleave_pairs(x, n, w.in);
  }
  if (isa == Isa::Avx512 && n >= kPanelTokens && w.any_of(is_float)) {
    input.xt = token_groups(x, n, w.in);
  }
  if (w.any_of(is_quantized)) input.xq = quantized_activations(w, x, n, isa);
  // Threads take whole panels of rows, so which kernel computes a row (and hence its rounding)
  // does not depend on the thread count.
  const int64_t panels = (w.out + kPanelRows - 1) / kPanelRows;
  pool.parallel_for(panels, [&](int64_t begin, int64_t end, int) {
    linear_rows(w, input, y, begin * kPanelRows, std::min(w.out, end * kPanelRows), accumulate,
                isa);
  });
}

float dot(const float* a, const float* b, int64_t len, Isa isa) {
  return dot_any_for_isa(isa)(a, b, len);
}

void axpy(float a, const float* x, float* y, int64_t len, Isa isa) {
  axpy_any_for_isa(isa)(a, x, y, len);
}

}  // namespace ffnskip::cpu
