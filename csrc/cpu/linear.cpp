#include "linear.h"

#include <algorithm>

#include "simd.h"

namespace ffnskip::cpu {

namespace {

// Tokens whose inputs stay cache-resident while a slice of weight rows streams past them.
constexpr int64_t kTokenBlock = 64;

// R weight rows times T tokens: R*T accumulators, each weight vector loaded once per T tokens.
template <int R, int T>
__attribute__((always_inline)) inline void tile(const LinearWeights& w, int64_t row,
                                                const float* x, float* y, bool accumulate) {
  const int64_t in = w.in;
  const float* wr = w.weight + row * in;
  vfloat acc[R][T] = {};
  int64_t i = 0;
  for (; i + kLanes <= in; i += kLanes) {
    vfloat xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xv[t] = load(x + t * in + i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vfloat wv = load(wr + r * in + i);
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
      for (int64_t j = i; j < in; ++j) s += wr[r * in + j] * x[t * in + j];
      float& dst = y[t * w.out + row + r];
      dst = accumulate ? dst + (s + b) : s + b;
    }
  }
}

template <int R, int T>
__attribute__((always_inline)) inline void rows_for_tokens(const LinearWeights& w,
                                                           int64_t row_begin, int64_t row_end,
                                                           const float* x, float* y,
                                                           bool accumulate) {
  int64_t row = row_begin;
  for (; row + R <= row_end; row += R) tile<R, T>(w, row, x, y, accumulate);
  for (; row < row_end; ++row) tile<1, T>(w, row, x, y, accumulate);
}

FFNSKIP_MULTIVERSION
void linear_rows(const LinearWeights& w, const float* x, int64_t n, float* y, int64_t row_begin,
                 int64_t row_end, bool accumulate) {
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t t_end = std::min(n, t0 + kTokenBlock);
    int64_t t = t0;
    for (; t + 4 <= t_end; t += 4) {
      rows_for_tokens<4, 4>(w, row_begin, row_end, x + t * w.in, y + t * w.out, accumulate);
    }
    for (; t < t_end; ++t) {
      rows_for_tokens<8, 1>(w, row_begin, row_end, x + t * w.in, y + t * w.out, accumulate);
    }
  }
}

}  // namespace

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
