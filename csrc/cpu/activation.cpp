#include "activation.h"

#include <cmath>

namespace ffnskip::cpu {

void swiglu(const float* gate_up, int64_t n, int64_t inter, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* gate = gate_up + t * 2 * inter;
    const float* up = gate + inter;
    float* dst = out + t * inter;
    for (int64_t i = 0; i < inter; ++i) dst[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

}  // namespace ffnskip::cpu
