#include "activation.h"

#include <cmath>

namespace ffnskip::cpu {

void swiglu(ThreadPool& pool, const float* gate_up, int64_t n, int64_t inter, float* out) {
  pool.parallel_for(n, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = gate_up + t * 2 * inter;
      const float* up = gate + inter;
      float* dst = out + t * inter;
      for (int64_t i = 0; i < inter; ++i) dst[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
  });
}

}  // namespace ffnskip::cpu
