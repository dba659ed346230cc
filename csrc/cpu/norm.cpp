#include "norm.h"

#include <cmath>


namespace ffnskip::cpu {

void rms_norm(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
              float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* row = x + t * dim;
    float* dst = out + t * dim;
    float sum_sq = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum_sq += row[i] * row[i];
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) dst[i] = weight[i] * (row[i] * inv_rms);
  }
}

}  // namespace ffnskip::cpu
