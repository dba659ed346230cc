#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "linear.h"
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
template <Isa I>
__attribute__((always_inline)) inline void attend_head(const HeadQuery& a) {
  float max_score = -INFINITY;
  for (int64_t j = 0; j < a.len; ++j) {
    a.scores[j] = dot_kernel<I>(a.q, a.k + j * a.kv_stride, a.head_dim) * a.scale;
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
    axpy_kernel<I>(a.scores[j] * inv_sum, a.v + j * a.kv_stride, a.out, a.head_dim);
  }
}

FFNSKIP_ISA_VARIANTS(void, attend_head, (const HeadQuery& a), (a))

// Above kStepExactTokens new tokens (prefill), attention runs as two GEMMs per KV head and block
// of kQueryBlock tokens: scores = Q K^T over the keys the block can see, a causal softmax, then
// P V. The GEMMs also multiply the masked-out upper triangle (zeros), but at GEMM speed, where
// one dot product per (query, key) spends most of its time on horizontal sums.
constexpr int kQueryBlock = 64;

void attention_as_gemms(ThreadPool& pool, const AttentionShape& shape, const float* q, int n,
                        int pos, const float* k_cache, const float* v_cache, float* out,
                        Isa isa) {
  const int group = shape.num_heads / shape.num_kv_heads;
  const int64_t d = shape.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Per calling thread; they grow to the largest pass, then never allocate.
  thread_local std::vector<float> keys, values_t, queries, scores, heads_out;
  keys.resize(static_cast<size_t>((pos + n) * d));
  for (int g = 0; g < shape.num_kv_heads; ++g) {
    const int64_t kv_offset = g * d;
    for (int64_t j = 0; j < pos + n; ++j) {  // this head's keys, contiguous: GEMM weight rows
      std::memcpy(keys.data() + j * d, k_cache + j * shape.kv_stride + kv_offset,
                  sizeof(float) * d);
    }
    for (int t0 = 0; t0 < n; t0 += kQueryBlock) {
      const int tokens = std::min(kQueryBlock, n - t0);
      const int64_t len = pos + t0 + tokens;  // keys the block's last query sees
      const int64_t rows = static_cast<int64_t>(tokens) * group;  // query row t * group + h
      queries.resize(static_cast<size_t>(rows * d));
      for (int t = 0; t < tokens; ++t) {
        for (int h = 0; h < group; ++h) {
          std::memcpy(queries.data() + (t * group + h) * d,
                      q + (t0 + t) * shape.q_stride + (g * group + h) * d, sizeof(float) * d);
        }
      }
      scores.resize(static_cast<size_t>(rows * len));
      linear(pool, LinearWeights({{keys.data(), TensorType::F32, len}}, d), queries.data(), rows,
             scores.data(), Output::Overwrite, isa);
      float* const probabilities = scores.data();  // workers must not name the thread_local
      pool.parallel_for(rows, [&](int64_t begin, int64_t end, int) {
        for (int64_t row = begin; row < end; ++row) {
          float* p = probabilities + row * len;
          const int64_t visible = pos + t0 + row / group + 1;
          float max_score = -INFINITY;
          for (int64_t j = 0; j < visible; ++j) {
            p[j] *= scale;
            max_score = std::max(max_score, p[j]);
          }
          float sum = 0.0f;
          for (int64_t j = 0; j < visible; ++j) {
            p[j] = std::exp(p[j] - max_score);
            sum += p[j];
          }
          const float inv_sum = 1.0f / sum;
          for (int64_t j = 0; j < visible; ++j) p[j] *= inv_sum;
          std::fill(p + visible, p + len, 0.0f);
        }
      });
      values_t.resize(static_cast<size_t>(d * len));  // V^T: GEMM weight rows of length len
      for (int64_t j = 0; j < len; ++j) {
        const float* v = v_cache + j * shape.kv_stride + kv_offset;
        for (int64_t e = 0; e < d; ++e) values_t[e * len + j] = v[e];
      }
      heads_out.resize(static_cast<size_t>(rows * d));
      linear(pool, LinearWeights({{values_t.data(), TensorType::F32, d}}, len), scores.data(),
             rows, heads_out.data(), Output::Overwrite, isa);
      for (int t = 0; t < tokens; ++t) {
        for (int h = 0; h < group; ++h) {
          std::memcpy(out + (t0 + t) * static_cast<int64_t>(shape.num_heads) * d +
                          (g * group + h) * d,
                      heads_out.data() + (t * group + h) * d, sizeof(float) * d);
        }
      }
    }
  }
}

}  // namespace

void attention(ThreadPool& pool, const AttentionShape& shape, const float* q, int n, int pos,
               const float* k_cache, const float* v_cache, float* scratch, float* out,
               Isa isa) {
  if (n > kStepExactTokens) {
    attention_as_gemms(pool, shape, q, n, pos, k_cache, v_cache, out, isa);
    return;
  }
  const auto attend = attend_head_for_isa(isa);
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
