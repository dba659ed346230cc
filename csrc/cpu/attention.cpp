#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../core/half.h"
#include "linear.h"
#include "simd.h"

namespace ffnskip::cpu {

namespace {

// Decode and verification passes (up to kStepExactTokens queries) cut each query's keys into
// chunks of kKeysPerChunk positions. A task is one query, one KV head and one chunk: it computes
// every query head of the group from one read of the chunk's keys and values (the heads of a
// group used to read them once each), and the tasks of a long context keep every thread busy.
// Chunks are cut by position alone, so a query's result depends neither on the other queries of
// the pass nor on the number of threads: a verification equals the steps bit for bit.
constexpr int64_t kKeysPerChunk = 256;

struct GroupChunk {
  const float* q;    // the group's first query head; its heads head_dim floats apart
  const void* k;     // the key at the chunk's first position; positions head_dim elements apart
  const void* v;     // likewise for values
  bool f16;          // the cache's elements are fp16 bits, else fp32
  int64_t len;       // positions in the chunk
  int heads;         // query heads of the group
  int head_dim;
  float scale;
  float* scores;     // [heads, kKeysPerChunk] scratch
  float* out;        // [heads, head_dim]: sum over the chunk of p v, p = e^(score - max)
  float* max;        // [heads]: the chunk's largest score per head
  float* sum;        // [heads]: sum of p
};

// Lanes values of the cache from p (of them the first `count` where partial), widened to fp32.
template <Isa I>
__attribute__((always_inline)) inline vfloat<I> load_cached(const float* p) {
  return load<vfloat<I>>(p);
}
template <Isa I>
__attribute__((always_inline)) inline vfloat<I> load_cached(const uint16_t* p) {
  return load_f16<I>(p);
}
template <Isa I>
__attribute__((always_inline)) inline vfloat<I> load_cached_partial(const float* p, int count) {
  return load_partial<vfloat<I>>(p, count);
}
template <Isa I>
__attribute__((always_inline)) inline vfloat<I> load_cached_partial(const uint16_t* p,
                                                                    int count) {
  uint16_t bits[kLanes<I>] = {};
  std::memcpy(bits, p, sizeof(uint16_t) * count);
  return load_f16<I>(bits);
}

inline float cached_value(float v) { return v; }
inline float cached_value(uint16_t bits) { return f16_to_float(bits); }

// The kernels below take head_dim as kHeadDim where it is a common size (then the block of keys
// is one pointer and constant offsets: sixteen row pointers took registers the sums need), or
// from the chunk where kHeadDim is 0.
template <int kHeadDim>
__attribute__((always_inline)) inline int head_dim_of(const GroupChunk& a) {
  return kHeadDim ? kHeadDim : a.head_dim;
}

// q.k for a block of as many keys as lanes from first_key; past the `keys` the chunk has left
// (kWholeBlock false), the last key again, its sums to be discarded.
template <Isa I, int kHeadDim, bool kWholeBlock, typename C>
__attribute__((always_inline)) inline vfloat<I> key_block_dots(const GroupChunk& a,
                                                               const float* q,
                                                               const C* first_key, int keys) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  const int d = head_dim_of<kHeadDim>(a);
  const int full = d / L * L;
  const int rest = d - full;
  auto row = [&](int j) { return first_key + (kWholeBlock ? j : std::min(j, keys - 1)) * d; };
  V acc[L] = {};
  for (int e = 0; e < full; e += L) {
    const V qe = load<V>(q + e);
    for (int j = 0; j < L; ++j) acc[j] += qe * load_cached<I>(row(j) + e);
  }
  if (rest) {
    const V qe = load_partial<V>(q + full, rest);
    for (int j = 0; j < L; ++j) acc[j] += qe * load_cached_partial<I>(row(j) + full, rest);
  }
  return transpose_sum(acc);
}

// Scores q.k * scale of every head over the chunk; a block's lanes past the chunk's end score
// -inf (p = 0 in the softmax).
template <Isa I, int kHeadDim, typename C>
__attribute__((always_inline)) inline void chunk_scores(const GroupChunk& a) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  const int d = head_dim_of<kHeadDim>(a);
  const C* const keys_of_chunk = static_cast<const C*>(a.k);
  for (int h = 0; h < a.heads; ++h) {
    const float* q = a.q + static_cast<int64_t>(h) * d;
    float* scores = a.scores + h * kKeysPerChunk;
    V max = splat<V>(-INFINITY);
    for (int64_t j0 = 0; j0 < a.len; j0 += L) {
      const int keys = static_cast<int>(std::min<int64_t>(L, a.len - j0));
      const C* first_key = keys_of_chunk + j0 * d;
      V block = keys == L ? key_block_dots<I, kHeadDim, true>(a, q, first_key, keys)
                          : key_block_dots<I, kHeadDim, false>(a, q, first_key, keys);
      block *= a.scale;
      for (int j = keys; j < L; ++j) block[j] = -INFINITY;
      max = max < block ? block : max;
      store(scores + j0, block);
    }
    const float m = reduce_max(max);
    a.max[h] = m;
    V sum{};
    for (int64_t j0 = 0; j0 < a.len; j0 += L) {
      const V p = exp_kernel(load<V>(scores + j0) - m);
      store(scores + j0, p);
      sum += p;
    }
    a.sum[h] = reduce_add(sum);
  }
}

// out[h, e0 .. e0 + width) = sum_j p[h, j] v[j, e0 ..] for kHeads heads from h0 and up to
// kVectors vectors of values (width floats; fewer than kVectors * lanes only at head_dim's end).
template <Isa I, int kHeadDim, typename C, int kHeads, int kVectors>
__attribute__((always_inline)) inline void chunk_values(const GroupChunk& a, int h0, int e0,
                                                        int width) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  const int d = head_dim_of<kHeadDim>(a);
  const C* const values_of_chunk = static_cast<const C*>(a.v);
  const bool whole = width == kVectors * L;
  V acc[kHeads][kVectors] = {};
  for (int64_t j0 = 0; j0 < a.len; j0 += L) {  // p of a block of keys from the (padded) scores
    V p[kHeads];
    for (int h = 0; h < kHeads; ++h) p[h] = load<V>(a.scores + (h0 + h) * kKeysPerChunk + j0);
    const int keys = static_cast<int>(std::min<int64_t>(L, a.len - j0));
    for (int j = 0; j < keys; ++j) {
      const C* row = values_of_chunk + (j0 + j) * d + e0;
      V values[kVectors];
      for (int u = 0; u < kVectors; ++u) {
        values[u] = whole ? load_cached<I>(row + u * L)
                          : load_cached_partial<I>(row + u * L, width - u * L);
      }
      for (int h = 0; h < kHeads; ++h) {
        const V pj = broadcast_lane(p[h], j);
        for (int u = 0; u < kVectors; ++u) acc[h][u] += pj * values[u];
      }
    }
  }
  for (int h = 0; h < kHeads; ++h) {
    float* out = a.out + static_cast<int64_t>(h0 + h) * d + e0;
    for (int u = 0; u < kVectors; ++u) {
      if (whole) {
        store(out + u * L, acc[h][u]);
      } else {
        store_partial(out + u * L, acc[h][u], width - u * L);
      }
    }
  }
}

// Heads [h0, h0 + kHeads) over every value of head_dim: four vectors at a time, then one.
template <Isa I, int kHeadDim, typename C, int kHeads>
__attribute__((always_inline)) inline void chunk_values_of_heads(const GroupChunk& a, int h0) {
  constexpr int L = kLanes<I>;
  constexpr int kVectors = 4;
  const int d = head_dim_of<kHeadDim>(a);
  int e0 = 0;
  for (; e0 + kVectors * L <= d; e0 += kVectors * L) {
    chunk_values<I, kHeadDim, C, kHeads, kVectors>(a, h0, e0, kVectors * L);
  }
  for (; e0 < d; e0 += L) {
    chunk_values<I, kHeadDim, C, kHeads, 1>(a, h0, e0, std::min(L, d - e0));
  }
}

template <Isa I, int kHeadDim, typename C>
__attribute__((always_inline)) inline void attend_chunk_of(const GroupChunk& a) {
  chunk_scores<I, kHeadDim, C>(a);
  // Accumulators: heads x 4 vectors, 16 of AVX-512's 32 registers, 8 of AVX2's 16.
  constexpr int kMostHeads = I == Isa::Avx512 ? 4 : 2;
  int h0 = 0;
  for (; h0 + kMostHeads <= a.heads; h0 += kMostHeads) {
    chunk_values_of_heads<I, kHeadDim, C, kMostHeads>(a, h0);
  }
  switch (a.heads - h0) {
    case 3: chunk_values_of_heads<I, kHeadDim, C, 3>(a, h0); break;
    case 2: chunk_values_of_heads<I, kHeadDim, C, 2>(a, h0); break;
    case 1: chunk_values_of_heads<I, kHeadDim, C, 1>(a, h0); break;
    default: break;
  }
}

template <Isa I, typename C>
__attribute__((always_inline)) inline void attend_chunk_in(const GroupChunk& a) {
  switch (a.head_dim) {
    case 64: attend_chunk_of<I, 64, C>(a); break;
    case 128: attend_chunk_of<I, 128, C>(a); break;
    default: attend_chunk_of<I, 0, C>(a); break;
  }
}

template <Isa I>
__attribute__((always_inline)) inline void attend_chunk(const GroupChunk& a) {
  if (a.f16) {
    attend_chunk_in<I, uint16_t>(a);
  } else {
    attend_chunk_in<I, float>(a);
  }
}

FFNSKIP_ISA_VARIANTS(void, attend_chunk, (const GroupChunk& a), (a))

struct ChunkTask {
  int query;      // within the pass
  int kv_head;
  int64_t begin;  // key positions [begin, end)
  int64_t end;
  int64_t slot;   // its first head's partial results, or -1 for a query's only chunk
};

int64_t chunks_of(int64_t len) { return (len + kKeysPerChunk - 1) / kKeysPerChunk; }

// The cache element `element` elements past `cache`.
const void* cache_at(const void* cache, int64_t element, TensorType type) {
  return static_cast<const char*>(cache) + row_bytes(type, element);
}

void attention_by_chunks(ThreadPool& pool, const AttentionShape& shape, const float* q, int n,
                         int pos, const void* k_cache, const void* v_cache, float* out,
                         Isa isa) {
  const auto attend = attend_chunk_for_isa(isa);
  const int group = shape.num_heads / shape.num_kv_heads;
  const int head_dim = shape.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int64_t out_stride = static_cast<int64_t>(shape.num_heads) * head_dim;
  // Per calling thread; they grow to the largest pass, then never allocate. The partial results
  // of a query of several chunks are slots [first_slot, ...) ordered by KV head, chunk, head.
  thread_local std::vector<ChunkTask> task_list;
  thread_local std::vector<int64_t> first_slots;
  thread_local std::vector<float> partial_out, partial_max, partial_sum;
  task_list.clear();
  first_slots.resize(n);
  int64_t slots = 0;
  for (int t = 0; t < n; ++t) {
    const int64_t len = pos + t + 1;
    const bool split = chunks_of(len) > 1;
    first_slots[t] = slots;
    for (int g = 0; g < shape.num_kv_heads; ++g) {
      for (int64_t begin = 0; begin < len; begin += kKeysPerChunk) {
        const int64_t end = std::min(len, begin + kKeysPerChunk);
        task_list.push_back({t, g, begin, end, split ? slots : -1});
        if (split) slots += group;
      }
    }
  }
  partial_out.resize(static_cast<size_t>(slots * head_dim));
  partial_max.resize(slots);
  partial_sum.resize(slots);
  // Workers must not name the thread_locals (they would see their own).
  const ChunkTask* tasks = task_list.data();
  const int64_t* first_slot = first_slots.data();
  float* const outs = partial_out.data();
  float* const maxes = partial_max.data();
  float* const sums = partial_sum.data();
  pool.parallel_for_dynamic(static_cast<int64_t>(task_list.size()), 1,
                            [&](int64_t first, int64_t last) {
    thread_local std::vector<float> scores, own_max, own_sum;  // the worker's own
    scores.resize(static_cast<size_t>(group) * kKeysPerChunk);
    own_max.resize(group);
    own_sum.resize(group);
    for (int64_t i = first; i < last; ++i) {
      const ChunkTask& task = tasks[i];
      const int64_t group_offset = static_cast<int64_t>(task.kv_head) * group * head_dim;
      const int64_t cache_offset = task.kv_head * shape.kv_head_stride + task.begin * head_dim;
      float* group_out = out + task.query * out_stride + group_offset;
      const bool split = task.slot >= 0;
      GroupChunk a;
      a.q = q + task.query * shape.q_stride + group_offset;
      a.k = cache_at(k_cache, cache_offset, shape.cache_type);
      a.v = cache_at(v_cache, cache_offset, shape.cache_type);
      a.f16 = shape.cache_type == TensorType::F16;
      a.len = task.end - task.begin;
      a.heads = group;
      a.head_dim = head_dim;
      a.scale = scale;
      a.scores = scores.data();
      a.out = split ? outs + task.slot * head_dim : group_out;
      a.max = split ? maxes + task.slot : own_max.data();
      a.sum = split ? sums + task.slot : own_sum.data();
      attend(a);
      if (!split) {  // the query's only chunk: normalise in place
        for (int h = 0; h < group; ++h) {
          const float inv_sum = 1.0f / a.sum[h];
          for (int e = 0; e < head_dim; ++e) group_out[h * head_dim + e] *= inv_sum;
        }
      }
    }
  });
  if (slots == 0) return;
  // A query of several chunks: out = sum_c w_c out_c / sum_c w_c sum_c, w_c = e^(max_c - max),
  // over its chunks in position order.
  pool.parallel_for(static_cast<int64_t>(n) * shape.num_kv_heads,
                    [&](int64_t first, int64_t last, int) {
    for (int64_t i = first; i < last; ++i) {
      const int t = static_cast<int>(i / shape.num_kv_heads);
      const int g = static_cast<int>(i % shape.num_kv_heads);
      const int64_t chunks = chunks_of(pos + t + 1);
      if (chunks == 1) continue;
      const int64_t base = first_slot[t] + g * chunks * group;
      for (int h = 0; h < group; ++h) {
        float m = -INFINITY;
        for (int64_t c = 0; c < chunks; ++c) m = std::max(m, maxes[base + c * group + h]);
        float* dst = out + t * out_stride + (static_cast<int64_t>(g) * group + h) * head_dim;
        std::fill(dst, dst + head_dim, 0.0f);
        float total = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t slot = base + c * group + h;
          const float w = std::exp(maxes[slot] - m);
          total += w * sums[slot];
          axpy(w, outs + slot * head_dim, dst, head_dim, isa);
        }
        const float inv_total = 1.0f / total;
        for (int e = 0; e < head_dim; ++e) dst[e] *= inv_total;
      }
    }
  });
}

// Above kStepExactTokens new tokens (prefill), attention runs as two GEMMs per KV head and block
// of kQueryBlock tokens: scores = Q K^T over the keys the block can see, a causal softmax, then
// P V. The GEMMs also multiply the masked-out upper triangle (zeros), but at GEMM speed, where
// one dot product per (query, key) spends most of its time on horizontal sums.
constexpr int kQueryBlock = 64;

// p[0 .. visible) = softmax(p * scale), p[visible .. len) = 0: one row of scores.
template <Isa I>
__attribute__((always_inline)) inline void causal_softmax(float* p, int64_t visible, int64_t len,
                                                          float scale) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  const int64_t full = visible / L * L;
  const int rest = static_cast<int>(visible - full);
  V tail = load_partial<V>(p + full, rest) * scale;  // its lanes from `rest` on score -inf
  for (int j = rest; j < L; ++j) tail[j] = -INFINITY;
  V max = tail;
  for (int64_t j = 0; j < full; j += L) {
    const V x = load<V>(p + j) * scale;
    store(p + j, x);
    max = max < x ? x : max;
  }
  const float m = reduce_max(max);
  tail = exp_kernel(tail - m);
  V sum = tail;
  for (int64_t j = 0; j < full; j += L) {
    const V e = exp_kernel(load<V>(p + j) - m);
    store(p + j, e);
    sum += e;
  }
  const float inv_sum = 1.0f / reduce_add(sum);
  for (int64_t j = 0; j < full; j += L) store(p + j, load<V>(p + j) * inv_sum);
  store_partial(p + full, tail * inv_sum, rest);
  std::fill(p + visible, p + len, 0.0f);
}

FFNSKIP_ISA_VARIANTS(void, causal_softmax, (float* p, int64_t visible, int64_t len, float scale),
                     (p, visible, len, scale))

void attention_as_gemms(ThreadPool& pool, const AttentionShape& shape, const float* q, int n,
                        int pos, const void* k_cache, const void* v_cache, float* out,
                        Isa isa) {
  const int group = shape.num_heads / shape.num_kv_heads;
  const int64_t d = shape.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const auto softmax = causal_softmax_for_isa(isa);
  // Per calling thread; they grow to the largest pass, then never allocate.
  thread_local std::vector<float> values_t, queries, scores, heads_out;
  for (int g = 0; g < shape.num_kv_heads; ++g) {
    // GEMM weight rows, fp32 or fp16 as the cache holds them.
    const void* keys = cache_at(k_cache, g * shape.kv_head_stride, shape.cache_type);
    const void* values = cache_at(v_cache, g * shape.kv_head_stride, shape.cache_type);
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
      linear(pool, LinearWeights({{keys, shape.cache_type, len}}, d), queries.data(), rows,
             scores.data(), Output::Overwrite, isa);
      float* const probabilities = scores.data();  // workers must not name the thread_local
      pool.parallel_for(rows, [&](int64_t begin, int64_t end, int) {
        for (int64_t row = begin; row < end; ++row) {
          softmax(probabilities + row * len, pos + t0 + row / group + 1, len, scale);
        }
      });
      values_t.resize(static_cast<size_t>(d * len));  // V^T: GEMM weight rows of length len
      auto transpose = [&](const auto* v) {
        for (int64_t j = 0; j < len; ++j) {
          for (int64_t e = 0; e < d; ++e) values_t[e * len + j] = cached_value(v[j * d + e]);
        }
      };
      if (shape.cache_type == TensorType::F16) {
        transpose(static_cast<const uint16_t*>(values));
      } else {
        transpose(static_cast<const float*>(values));
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
               const void* k_cache, const void* v_cache, float* out, Isa isa) {
  if (shape.cache_type != TensorType::F32 && shape.cache_type != TensorType::F16) {
    throw std::invalid_argument(std::string("attention: a KV cache of ") +
                                tensor_type_name(shape.cache_type) + " (F32 or F16)");
  }
  if (n > kStepExactTokens) {
    attention_as_gemms(pool, shape, q, n, pos, k_cache, v_cache, out, isa);
  } else {
    attention_by_chunks(pool, shape, q, n, pos, k_cache, v_cache, out, isa);
  }
}

}  // namespace ffnskip::cpu
