#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd.h"

namespace ffnskip::cpu {

namespace {

struct HeadQuery {
  const float* q;        // [head_dim]
  const float* k;        // the head's first cached key; positions kv_stride floats apart
  const float* v;        // likewise for values
  int64_t kv_stride;
  int64_t len;           // cached positions attended to
  int head_dim;
  float scale;
  float* scores;         // [len] scratch
  float* out;            // [head_dim]
};

// softmax(q K^T * scale) V for one query of one head.
__attribute__((always_inline)) inline void attend_head(const HeadQuery& a) {
  float max_score = -INFINITY;
  for (int64_t j = 0; j < a.len; ++j) {
    a.scores[j] = dot_kernel(a.q, a.k + j * a.kv_stride, a.head_dim) * a.scale;
    max_score = std::max(max_score, a.scores[j]);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < a.len; ++j) {
    a.scores[j] = std::exp(a.scores[j] - max_score);
    sum += a.scores[j];
  }
  const float inv_sum = 1.0f / sum;
  std::memset(a.out, 0, sizeof(float) * a.head_dim);
  for (int64_t j = 0; j < a.len; ++j) {
    axpy_kernel(a.scores[j] * inv_sum, a.v + j * a.kv_stride, a.out, a.head_dim);
  }
}

FFNSKIP_ISA_VARIANTS(void, attend_head, (const HeadQuery& a), (a))

}  // namespace

void attention(ThreadPool& pool, const AttentionShape& shape, const float* q, int n, int pos,
               const float* k_cache, const float* v_cache, float* scratch, float* out) {
  const auto attend = attend_head_for_isa();
  const int group = shape.num_heads / shape.num_kv_heads;
  const int head_dim = shape.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int64_t scratch_len = static_cast<int64_t>(pos) + n;
  const int64_t tasks = static_cast<int64_t>(n) * shape.num_heads;
  const int64_t threads = pool.size();
  // Causal work grows with the query's position, so each thread takes every threads-th task
  // (query, head) rather than a contiguous range: the threads finish together.
  pool.parallel_for(std::min(tasks, threads), [&](int64_t first, int64_t, int chunk) {
    HeadQuery a;
    a.kv_stride = shape.kv_stride;
    a.head_dim = head_dim;
    a.scale = scale;
    a.scores = scratch + chunk * scratch_len;
    for (int64_t task = first; task < tasks; task += threads) {
      const int64_t t = task / shape.num_heads;
      const int h = static_cast<int>(task % shape.num_heads);
      const int64_t kv_offset = static_cast<int64_t>(h / group) * head_dim;
      a.q = q + t * shape.q_stride + static_cast<int64_t>(h) * head_dim;
      a.k = k_cache + kv_offset;
      a.v = v_cache + kv_offset;
      a.len = pos + t + 1;
      a.out = out + t * static_cast<int64_t>(shape.num_heads) * head_dim +
              static_cast<int64_t>(h) * head_dim;
      attend(a);
    }
  });
}

}  // namespace ffnskip::cpu
