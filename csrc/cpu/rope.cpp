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
                const float* sin_t, bool interleaved) {
  const int half = head_dim / 2;
  // The partner of element i (i < half): i + half, or with interleaved pairs, 2i + 1 for 2i.
  const int first_step = interleaved ? 2 : 1;
  const int partner = interleaved ? 1 : half;
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos_t + t * half;
    const float* s = sin_t + t * half;
    for (int h = 0; h < heads; ++h) {
      float* v = x + t * stride + static_cast<int64_t>(h) * head_dim;
      for (int i = 0; i < half; ++i) {
        float* pa = v + i * first_step;
        float* pb = pa + partner;
        const float a = *pa;
        const float b = *pb;
        *pa = a * c[i] - b * s[i];
        *pb = b * c[i] + a * s[i];
      }
    }
  }
}

}  // namespace ffnskip::cpu
