#include "linear.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

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

template <Isa I>
__attribute__((always_inline)) inline void linear_rows(const LinearWeights& w, const float* x,
                                                       int64_t n, float* y, int64_t row_begin,
                                                       int64_t row_end, bool accumulate) {
  if (w.type == WeightType::BF16) {
    token_blocks<uint16_t>(w, x, n, y, row_begin, row_end, accumulate);
  } else {
    token_blocks<float>(w, x, n, y, row_begin, row_end, accumulate);
  }
}

__attribute__((always_inline)) inline float dot_kernel(const float* a, const float* b,
                                                       int64_t len) {
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

__attribute__((always_inline)) inline void axpy_kernel(float a, const float* x, float* y,
                                                       int64_t len) {
  const vfloat av = splat(a);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) store(y + i, load(y + i) + av * load(x + i));
  for (; i < len; ++i) y[i] += a * x[i];
}

struct Kernels {
  void (*linear_rows)(const LinearWeights&, const float*, int64_t, float*, int64_t, int64_t,
                      bool);
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy)(float, const float*, float*, int64_t);
};

// The kernels compiled for one instruction set: the templates inlined into functions with its
// target attribute become its code.
#define FFNSKIP_KERNELS(isa, target)                                                               \
  target __attribute__((flatten)) void linear_rows_##isa(                                          \
      const LinearWeights& w, const float* x, int64_t n, float* y, int64_t row_begin,              \
      int64_t row_end, bool accumulate) {                                                          \
    linear_rows<Isa::isa>(w, x, n, y, row_begin, row_end, accumulate);                             \
  }                                                                                                \
  target float dot_##isa(const float* a, const float* b, int64_t len) {                            \
    return dot_kernel(a, b, len);                                                                  \
  }                                                                                                \
  target void axpy_##isa(float a, const float* x, float* y, int64_t len) {                         \
    axpy_kernel(a, x, y, len);                                                                     \
  }                                                                                                \
  constexpr Kernels kKernels##isa = {linear_rows_##isa, dot_##isa, axpy_##isa};

FFNSKIP_KERNELS(Default, )
#ifdef FFNSKIP_X86_DISPATCH
FFNSKIP_KERNELS(Avx2, FFNSKIP_TARGET_AVX2)
FFNSKIP_KERNELS(Avx512, FFNSKIP_TARGET_AVX512)
#endif

const Kernels& kernels() {
  static const Kernels& chosen = []() -> const Kernels& {
    switch (kernel_isa()) {
#ifdef FFNSKIP_X86_DISPATCH
      case Isa::Avx512: return kKernelsAvx512;
      case Isa::Avx2: return kKernelsAvx2;
#endif
      default: return kKernelsDefault;
    }
  }();
  return chosen;
}

Isa best_isa() {
#ifdef FFNSKIP_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::Avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::Avx2;
#endif
  return Isa::Default;
}

Isa isa_from_environment() {
  const Isa best = best_isa();
  const char* requested = std::getenv("FFNSKIP_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  for (const Isa isa : {Isa::Default, Isa::Avx2, Isa::Avx512}) {
    if (std::string(requested) != isa_name(isa)) continue;
    if (isa > best) {
      throw std::invalid_argument(std::string("FFNSKIP_CPU_ISA=") + requested +
                                  ", but this CPU supports at most " + isa_name(best));
    }
    return isa;
  }
  throw std::invalid_argument(std::string("FFNSKIP_CPU_ISA=") + requested +
                              ": expected avx512, avx2 or default");
}

}  // namespace

Isa kernel_isa() {
  static const Isa isa = isa_from_environment();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Default: break;
  }
  return "default";
}

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
  const auto rows = kernels().linear_rows;
  pool.parallel_for(w.out, [&](int64_t begin, int64_t end, int) {
    rows(w, x, n, y, begin, end, accumulate);
  });
}

float dot(const float* a, const float* b, int64_t len) { return kernels().dot(a, b, len); }

void axpy(float a, const float* x, float* y, int64_t len) { kernels().axpy(a, x, y, len); }

}  // namespace ffnskip::cpu
