#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "linear.h"

namespace ffnskip::cpu {

void attention(ThreadPool& pool, const AttentionShape& shape, const float* q, int n, int pos,
               const float* k_cache, const float* v_cache, float* scratch, float* out) {
  const int group = shape.num_heads / shape.num_kv_heads;
  const int head_dim = shape.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int64_t scratch_len = static_cast<int64_t>(pos) + n;
  pool.parallel_for(static_cast<int64_t>(n) * shape.num_heads,
                    [&](int64_t begin, int64_t end, int chunk) {
    float* scores = scratch + chunk * scratch_len;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / shape.num_heads;
      const int h = static_cast<int>(task % shape.num_heads);
      const int64_t kv_offset = static_cast<int64_t>(h / group) * head_dim;
      const float* qh = q + t * shape.q_stride + static_cast<int64_t>(h) * head_dim;
      const int64_t len = pos + t + 1;
      float max_score = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        scores[j] = dot(qh, k_cache + j * shape.kv_stride + kv_offset, head_dim) * scale;
        max_score = std::max(max_score, scores[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        sum += scores[j];
      }
      const float inv_sum = 1.0f / sum;
      float* oh = out + t * static_cast<int64_t>(shape.num_heads) * head_dim +
                  static_cast<int64_t>(h) * head_dim;
      std::memset(oh, 0, sizeof(float) * head_dim);
      for (int64_t j = 0; j < len; ++j) {
        axpy(scores[j] * inv_sum, v_cache + j * shape.kv_stride + kv_offset, oh, head_dim);
      }
    }
  });
}

}  // namespace ffnskip::cpu
