#include "activation.h"

#include "simd.h"

namespace ffnskip::cpu {

namespace {

// silu(g) = g / (1 + e^-g): where e^-g is inf (g < -88), g / inf = -0, the limit.
template <Isa I>
__attribute__((always_inline)) inline void swiglu_row(const float* gate, const float* up,
                                                      int64_t inter, float* out) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  auto swiglu = [](V g, V u) { return g / (1.0f + exp_kernel(-g)) * u; };
  int64_t i = 0;
  for (; i + L <= inter; i += L) store(out + i, swiglu(load<V>(gate + i), load<V>(up + i)));
  const int rest = static_cast<int>(inter - i);
  if (rest) {
    store_partial(out + i, swiglu(load_partial<V>(gate + i, rest), load_partial<V>(up + i, rest)),
                  rest);
  }
}

FFNSKIP_ISA_VARIANTS(void, swiglu_row,
                     (const float* gate, const float* up, int64_t inter, float* out),
                     (gate, up, inter, out))

}  // namespace

void swiglu(ThreadPool& pool, const float* gate_up, int64_t n, int64_t inter, float* out,
            Isa isa) {
  const auto row = swiglu_row_for_isa(isa);
  pool.parallel_for(n, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = gate_up + t * 2 * inter;
      row(gate, gate + inter, inter, out + t * inter);
    }
  });
}

}  // namespace ffnskip::cpu
