#include "linear.h"

#include <algorithm>

#include "simd.h"

namespace ffnskip::cpu {

namespace {

// Tokens whose inputs stay cache-resident while a slice of weight rows streams past them.
constexpr int64_t kTokenBlock = 64;

typedef uint16_t vbf16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vu32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

__attribute__((always_inline)) inline vfloat load_weights(const float* p) { return load(p); }

__attribute__((always_inline)) inline vfloat load_weights(const uint16_t* p) {
  vbf16 half;
  std::memcpy(&half, p, sizeof(half));
  const vu32 wide = __builtin_convertvector(half, vu32) << 16;
  vfloat f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

__attribute__((always_inline)) inline float weight_at(const float* p) { return *p; }
__attribute__((always_inline)) inline float weight_at(const uint16_t* p) {
  return bf16_to_float(*p);
}

// R weight rows times T tokens: R*T accumulators, each weight vector loaded once per T tokens.
template <int R, int T, typename W>
__attribute__((always_inline)) inline void tile(const LinearWeights& w, int64_t row,
                                                const float* x, float* y, bool accumulate) {
  const int64_t in = w.in;
  const W* wr = static_cast<const W*>(w.weight) + row * in;
  vfloat acc[R][T] = {};
  int64_t i = 0;
  for (; i + kLanes <= in; i += kLanes) {
    vfloat xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xv[t] = load(x + t * in + i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vfloat wv = load_weights(wr + r * in + i);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] += wv * xv[t];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = w.bias ? w.bias[row + r] : 0.0f;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      float s = reduce_add(acc[r][t]);
      for (int64_t j = i; j < in; ++j) s += weight_at(wr + r * in + j) * x[t * in + j];
      float& dst = y[t * w.out + row + r];
      dst = accumulate ? dst + (s + b) : s + b;
    }
  }
}

template <int R, int T, typename W>
__attribute__((always_inline)) inline void rows_for_tokens(const LinearWeights& w,
                                                           int64_t row_begin, int64_t row_end,
                                                           const float* x, float* y,
                                                           bool accumulate) {
  int64_t row = row_begin;
  for (; row + R <= row_end; row += R) tile<R, T, W>(w, row, x, y, accumulate);
  for (; row < row_end; ++row) tile<1, T, W>(w, row, x, y, accumulate);
}

template <typename W>
__attribute__((always_inline)) inline void token_blocks(const LinearWeights& w, const float* x,
                                                        int64_t n, float* y, int64_t row_begin,
                                                        int64_t row_end, bool accumulate) {
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t t_end = std::min(n, t0 + kTokenBlock);
    int64_t t = t0;
    for (; t + 4 <= t_end; t += 4) {
      rows_for_tokens<4, 4, W>(w, row_begin, row_end, x + t * w.in, y + t * w.out, accumulate);
    }
    for (; t < t_end; ++t) {
      rows_for_tokens<8, 1, W>(w, row_begin, row_end, x + t * w.in, y + t * w.out, accumulate);
    }
  }
}

FFNSKIP_MULTIVERSION
void linear_rows(const LinearWeights& w, const float* x, int64_t n, float* y, int64_t row_begin,
                 int64_t row_end, bool accumulate) {
  if (w.type == WeightType::BF16) {
    token_blocks<uint16_t>(w, x, n, y, row_begin, row_end, accumulate);
  } else {
    token_blocks<float>(w, x, n, y, row_begin, row_end, accumulate);
  }
}

}  // namespace

std::vector<uint16_t> to_bf16(const float* data, int64_t count) {
  std::vector<uint16_t> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out[i] = float_to_bf16(data[i]);
  return out;
}

LinearWeights LinearWeights::rows(int64_t first, int64_t count) const {
  const size_t element = type == WeightType::BF16 ? sizeof(uint16_t) : sizeof(float);
  LinearWeights part = *this;
  part.weight = static_cast<const char*>(weight) + first * in * element;
  part.bias = bias ? bias + first : nullptr;
  part.out = count;
  return part;
}

void linear(ThreadPool& pool, const LinearWeights& w, const float* x, int64_t n, float* y,
            Output mode) {
  const bool accumulate = mode == Output::Accumulate;
  pool.parallel_for(w.out, [&](int64_t begin, int64_t end, int) {
    linear_rows(w, x, n, y, begin, end, accumulate);
  });
}

FFNSKIP_MULTIVERSION
float dot(const float* a, const float* b, int64_t len) {
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

FFNSKIP_MULTIVERSION
void axpy(float a, const float* x, float* y, int64_t len) {
  const vfloat av = splat(a);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) store(y + i, load(y + i) + av * load(x + i));
  for (; i < len; ++i) y[i] += a * x[i];
}

}  // namespace ffnskip::cpu
