#include "rope.h"

#include <cmath>

namespace ffnskip::cpu {

void rope_tables(const float* inv_freq, int half, int pos, int n, float* cos_out,
                 float* sin_out) {
  for (int t = 0; t < n; ++t) {
    // fp32 product as in transformers (inv_freq @ position_ids in float32).
    const float p = static_cast<float>(pos + t);
    for (int i = 0; i < half; ++i) {
      const float angle = inv_freq[i] * p;
      cos_out[t * half + i] = std::cos(angle);
      sin_out[t * half + i] = std::sin(angle);
    }
  }
}

void apply_rope(float* x, int64_t n, int64_t stride, int heads, int head_dim, const float* cos_t,
                const float* sin_t) {
  const int half = head_dim / 2;
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos_t + t * half;
    const float* s = sin_t + t * half;
    for (int h = 0; h < heads; ++h) {
      float* v = x + t * stride + static_cast<int64_t>(h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

}  // namespace ffnskip::cpu
