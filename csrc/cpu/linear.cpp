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
// The dot-product tiles: weight rows times tokens, and decode's rows per tile, as many
// accumulators as the registers hold (32 zmm with AVX-512, 16 ymm or xmm otherwise).
template <Isa I>
constexpr int kTileRows = I == Isa::Avx512 ? 4 : 2;
constexpr int kTileTokens = 4;
constexpr int kDecodeRows = 8;
// Threads take whole chunks of rows, a multiple of every instruction set's panel (below).
constexpr int kChunkRows = 32;
// Pieces of a linear's chunks per thread: enough for the threads to even out their finishing
// times, few enough that taking one (an atomic add) costs nothing next to it.
constexpr int64_t kPiecesPerThread = 8;

// One float matrix of a linear's part, as the float kernels read it: its rows [row, ...) write
// y[t * out + row]; `out` is the whole linear's row count (the y stride), `bias` the part's.
struct Matrix {
  const void* weight;
  const float* bias;
  int64_t out;
  int64_t in;
};

// How a storage type widens to fp32 vectors of instruction set I. A block of kParts * lanes
// weights becomes kParts vectors, each multiplied by the vector of x at the same offset in the
// block; `at` widens one weight of the scalar tail (x is in its natural order there).
template <Isa I>
struct F32Weights {
  using Stored = float;
  static constexpr int kParts = 1;
  __attribute__((always_inline)) static void widen(const float* p, vfloat<I>* out) {
    out[0] = load<vfloat<I>>(p);
  }
  static float at(const float* p) { return *p; }
};

// 2L bf16 weights read as L u32 lanes hold the even-indexed weights in their low halves and
// the odd ones in their high halves, so a shift and a mask widen them (the usual zero-extend
// and shift take a cross-lane shuffle per vector). x is stored de-interleaved to match: the L
// even elements of each block of 2L, then the L odd ones. Activations stay fp32.
template <Isa I>
struct BF16Weights {
  using Stored = uint16_t;
  static constexpr int kParts = 2;
  __attribute__((always_inline)) static void widen(const uint16_t* p, vfloat<I>* out) {
    vu32<I> pairs;
    std::memcpy(&pairs, p, sizeof(pairs));
    out[0] = bits_as<vfloat<I>>(pairs << 16);
    out[1] = bits_as<vfloat<I>>(pairs & 0xFFFF0000u);
  }
  static float at(const uint16_t* p) { return bf16_to_float(*p); }
};

#ifdef FFNSKIP_X86_DISPATCH
// One float broadcast to every lane straight from memory (a generic-vector splat costs an add
// or a lane-by-lane build in GCC's code for these targets). Not always_inline, for the reason
// simd.h gives for its F16C loads.
FFNSKIP_TARGET_AVX512 inline vfloat<Isa::Avx512> broadcast_avx512(const float* p) {
  return bits_as<vfloat<Isa::Avx512>>(_mm512_set1_ps(*p));
}

FFNSKIP_TARGET_AVX2 inline vfloat<Isa::Avx2> broadcast_avx2(const float* p) {
  return bits_as<vfloat<Isa::Avx2>>(_mm256_broadcast_ss(p));
}
#endif

template <Isa I>
struct F16Weights {
  using Stored = uint16_t;
  static constexpr int kParts = 1;
  __attribute__((always_inline)) static void widen(const uint16_t* p, vfloat<I>* out) {
    out[0] = load_f16<I>(p);
  }
  static float at(const uint16_t* p) { return f16_to_float(*p); }
};

// R weight rows times T tokens: R*T accumulators, each weight block widened once per T tokens.
template <Isa I, int R, int T, template <Isa> class Weights>
__attribute__((always_inline)) inline void tile(const Matrix& w, int64_t row,
                                                const float* x, float* y, bool accumulate) {
  using V = vfloat<I>;
  using W = Weights<I>;
  constexpr int L = kLanes<I>, P = W::kParts;
  constexpr int64_t kBlock = P * L;
  const int64_t in = w.in;
  const typename W::Stored* wr = static_cast<const typename W::Stored*>(w.weight) + row * in;
  V acc[R][T] = {};
  int64_t i = 0;
  for (; i + kBlock <= in; i += kBlock) {
    V xv[T][P];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) xv[t][p] = load<V>(x + t * in + i + p * L);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // A decode step reads each weight once, and the hardware prefetcher starts over at each
      // tile (a bf16 row of 576 is 18 cache lines): fetch the next tile's rows meanwhile.
      if constexpr (T == 1) __builtin_prefetch(wr + (r + R) * in + i);
      V wv[P];
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
template <Isa I, int R, template <Isa> class W>
__attribute__((always_inline)) inline void rows_for_token(const Matrix& w,
                                                          int64_t row_begin, int64_t row_end,
                                                          const float* x, float* y,
                                                          bool accumulate) {
  int64_t row = row_begin;
  for (; row + R <= row_end; row += R) tile<I, R, 1, W>(w, row, x, y, accumulate);
  for (; row < row_end; ++row) tile<I, 1, 1, W>(w, row, x, y, accumulate);
}

// Within a block of tokens, each tile of weight rows stays in L1 while every group of
// kTileTokens tokens (their inputs in L2) passes it: the rows come from memory once per block.
template <Isa I, template <Isa> class W>
__attribute__((always_inline)) inline void token_blocks(const Matrix& w, const float* x,
                                                        int64_t n, float* y, int64_t row_begin,
                                                        int64_t row_end, bool accumulate) {
  constexpr int R = kTileRows<I>, T = kTileTokens;
  const int64_t in = w.in, out = w.out;
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t t_end = std::min(n, t0 + kTokenBlock);
    const int64_t t_tiled = t0 + (t_end - t0) / T * T;
    int64_t row = row_begin;
    for (; row + R <= row_end; row += R) {
      for (int64_t t = t0; t < t_tiled; t += T) {
        tile<I, R, T, W>(w, row, x + t * in, y + t * out, accumulate);
      }
    }
    for (; row < row_end; ++row) {
      for (int64_t t = t0; t < t_tiled; t += T) {
        tile<I, 1, T, W>(w, row, x + t * in, y + t * out, accumulate);
      }
    }
    for (int64_t t = t_tiled; t < t_end; ++t) {  // one token (decode), or a block's last few
      rows_for_token<I, kDecodeRows, W>(w, row_begin, row_end, x + t * in, y + t * out,
                                        accumulate);
    }
  }
}

// The outer-product kernel's tile (below): a panel of kPanelVectors vectors of weight rows
// times kPanelTokens<I> tokens, its accumulators filling the registers but a few (AVX-512: 24
// of 32 zmm; AVX2: 12 of 16 ymm). None on the baseline.
constexpr int kPanelVectors = 2;
template <Isa I>
constexpr int kPanelRows = kPanelVectors * kLanes<I>;
template <Isa I>
constexpr int kPanelTokens = I == Isa::Avx512 ? 12 : 6;
static_assert(kChunkRows % kPanelRows<Isa::Avx512> == 0 &&
              kChunkRows % kPanelRows<Isa::Avx2> == 0);

bool has_panels(Isa isa) { return isa == Isa::Avx512 || isa == Isa::Avx2; }
int panel_tokens_of(Isa isa) {
  return isa == Isa::Avx512 ? kPanelTokens<Isa::Avx512> : kPanelTokens<Isa::Avx2>;
}

// The inputs of a linear in the layouts its kernels read.
struct LinearInput {
  const float* x;   // [n, in], natural order
  const float* xs;  // x, or for bf16 weights each block of 2 * lanes de-interleaved
                    // (BF16Weights)
  const float* xt;  // the panel path's token groups, [n / G][in][G] for G = kPanelTokens<I>;
                    // or null where that path is not taken
  QuantInput xq;     // for quantised weights, in the formats they read
  int64_t n;
};

#ifdef FFNSKIP_X86_DISPATCH
// Many tokens: y[t, rows] as outer products. A panel of kPanelRows<I> weight rows is
// transposed and widened to fp32 once, [in][kPanelRows<I>], then every group of T tokens
// broadcasts its inputs against it: two panel loads per 2T FMAs and no horizontal sums, where
// the dot-product tiles above need both.

template <Isa I>
__attribute__((always_inline)) inline vfloat<I> broadcast(const float* p) {
  if constexpr (I == Isa::Avx512) {
    return broadcast_avx512(p);
  } else {
    return broadcast_avx2(p);
  }
}

// Row by row, a vector at a time where the widened lanes are in their natural order (one
// instruction for F16 where a scalar fp16 conversion takes a dozen).
template <Isa I, typename W>
__attribute__((always_inline)) inline void pack_panel(const Matrix& w, int64_t row,
                                                      float* panel) {
  constexpr int L = kLanes<I>, kRows = kPanelRows<I>;
  const int64_t in = w.in;
  const typename W::Stored* src = static_cast<const typename W::Stored*>(w.weight) + row * in;
  for (int r = 0; r < kRows; ++r) {
    const typename W::Stored* wr = src + r * in;
    int64_t k = 0;
    if constexpr (W::kParts == 1) {
      for (; k + L <= in; k += L) {
        vfloat<I> v;
        W::widen(wr + k, &v);
#pragma GCC unroll 16
        for (int j = 0; j < L; ++j) panel[(k + j) * kRows + r] = v[j];
      }
    }
    for (; k < in; ++k) panel[k * kRows + r] = W::at(wr + k);
  }
}

// T tokens' outputs for one panel; token t's input k is x[t * t_stride + k * k_stride].
template <Isa I, int T>
__attribute__((always_inline)) inline void panel_tokens(const Matrix& w, int64_t row,
                                                        const float* panel, const float* x,
                                                        int64_t t_stride, int64_t k_stride,
                                                        float* y, bool accumulate) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>, kRows = kPanelRows<I>;
  V acc[T][kPanelVectors] = {};
  for (int64_t k = 0; k < w.in; ++k) {
    const V p0 = load<V>(panel + k * kRows);
    const V p1 = load<V>(panel + k * kRows + L);
#pragma GCC unroll 12
    for (int t = 0; t < T; ++t) {
      const V xv = broadcast<I>(x + t * t_stride + k * k_stride);
      acc[t][0] += xv * p0;
      acc[t][1] += xv * p1;
    }
  }
  const V b0 = w.bias ? load<V>(w.bias + row) : V{};
  const V b1 = w.bias ? load<V>(w.bias + row + L) : V{};
#pragma GCC unroll 12
  for (int t = 0; t < T; ++t) {
    float* dst = y + t * w.out + row;
    store(dst, accumulate ? load<V>(dst) + (acc[t][0] + b0) : acc[t][0] + b0);
    store(dst + L, accumulate ? load<V>(dst + L) + (acc[t][1] + b1) : acc[t][1] + b1);
  }
}

// Rows [row_begin, row_end) in whole panels; returns the first row it left (fewer than a
// panel remain).
template <Isa I, typename W>
__attribute__((always_inline)) inline int64_t panel_rows(const Matrix& w,
                                                         const LinearInput& input, float* y,
                                                         int64_t row_begin, int64_t row_end,
                                                         bool accumulate) {
  constexpr int T = kPanelTokens<I>, kRows = kPanelRows<I>;
  thread_local std::vector<float> panel;  // grows to the widest input, then never allocates
  panel.resize(static_cast<size_t>(w.in * kRows));
  const int64_t in = w.in, out = w.out, n = input.n;
  const int64_t grouped = n / T * T;
  int64_t row = row_begin;
  for (; row + kRows <= row_end; row += kRows) {
    pack_panel<I, W>(w, row, panel.data());
    for (int64_t t = 0; t < grouped; t += T) {
      panel_tokens<I, T>(w, row, panel.data(), input.xt + t * in, 1, T, y + t * out,
                         accumulate);
    }
    for (int64_t t = grouped; t < n; ++t) {
      panel_tokens<I, 1>(w, row, panel.data(), input.x + t * in, in, 1, y + t * out,
                         accumulate);
    }
  }
  return row;
}

#endif

template <Isa I, template <Isa> class W>
__attribute__((always_inline)) inline void rows_of_type(const Matrix& w,
                                                        const LinearInput& input, float* y,
                                                        int64_t row_begin, int64_t row_end,
                                                        bool accumulate) {
#ifdef FFNSKIP_X86_DISPATCH
  if constexpr (I != Isa::Default) {
    if (input.xt) row_begin = panel_rows<I, W<I>>(w, input, y, row_begin, row_end, accumulate);
  }
#endif
  token_blocks<I, W>(w, input.xs, input.n, y, row_begin, row_end, accumulate);
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
      rows_of_type<I, F16Weights>(w, input, y, row_begin, row_end, accumulate);
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
template <Isa I>
__attribute__((always_inline)) inline float dot_any(const float* a, const float* b,
                                                    int64_t len) {
  return dot_kernel<I>(a, b, len);
}
FFNSKIP_ISA_VARIANTS(float, dot_any, (const float* a, const float* b, int64_t len), (a, b, len))

template <Isa I>
__attribute__((always_inline)) inline void axpy_any(float a, const float* x, float* y,
                                                    int64_t len) {
  axpy_kernel<I>(a, x, y, len);
}
FFNSKIP_ISA_VARIANTS(void, axpy_any, (float a, const float* x, float* y, int64_t len),
                     (a, x, y, len))

int lanes_of_isa(Isa isa) {
  return isa == Isa::Avx512 ? kLanes<Isa::Avx512>
                            : isa == Isa::Avx2 ? kLanes<Isa::Avx2> : kLanes<Isa::Default>;
}

// x with each full block of 2 * lanes elements de-interleaved for BF16Weights; the tail as it
// is.
const float* deinterleave_pairs(const float* x, int64_t n, int64_t in, int lanes) {
  const int64_t block = 2 * lanes;
  thread_local std::vector<float> out;  // grows to the largest input, then never allocates
  out.resize(static_cast<size_t>(n * in));
  for (int64_t t = 0; t < n; ++t) {
    const float* src = x + t * in;
    float* dst = out.data() + t * in;
    int64_t i = 0;
    for (; i + block <= in; i += block) {
      for (int64_t j = 0; j < lanes; ++j) {
        dst[i + j] = src[i + 2 * j];
        dst[i + lanes + j] = src[i + 2 * j + 1];
      }
    }
    std::copy(src + i, src + in, dst + i);
  }
  return out.data();
}

// x's whole groups of `size` tokens, each transposed to [in][size] (the panel kernel's
// broadcasts then read consecutive floats).
const float* token_groups(const float* x, int64_t n, int64_t in, int size) {
  thread_local std::vector<float> out;  // grows to the largest input, then never allocates
  const int64_t groups = n / size;
  out.resize(static_cast<size_t>(groups * size * in));
  for (int64_t g = 0; g < groups; ++g) {
    const float* src = x + g * size * in;
    float* dst = out.data() + g * size * in;
    for (int64_t k = 0; k < in; ++k) {
      for (int t = 0; t < size; ++t) dst[k * size + t] = src[t * in + k];
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
    input.xs = deinterleave_pairs(x, n, w.in, lanes_of_isa(isa));
  }
  if (has_panels(isa) && n > kStepExactTokens && w.any_of(is_float)) {
    input.xt = token_groups(x, n, w.in, panel_tokens_of(isa));
  }
  if (w.any_of(is_quantized)) input.xq = quantized_activations(w, x, n, isa);
  // Threads take whole chunks of panels, so which kernel computes a row (and hence its
  // rounding) does not depend on the thread count; they take them a few at a time as they
  // finish, since one decode step's threads stream their rows at different speeds.
  const int64_t chunks = (w.out + kChunkRows - 1) / kChunkRows;
  pool.parallel_for_dynamic(chunks, chunks / (kPiecesPerThread * pool.size()),
                            [&](int64_t begin, int64_t end) {
    linear_rows(w, input, y, begin * kChunkRows, std::min(w.out, end * kChunkRows), accumulate,
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
