// Causal grouped-query attention of n new query tokens over the KV cache of one layer.
#pragma once

#include <cstdint>

#include "isa.h"
#include "thread_pool.h"

namespace ffnskip::cpu {

struct AttentionShape {
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int64_t q_stride;   // floats between consecutive query rows
  int64_t kv_stride;  // floats between consecutive cache positions
};

// Query t (absolute position pos + t) attends to cache positions 0 .. pos + t.
// `scratch` holds pool.size() * (pos + n) floats. out is [n, num_heads * head_dim].
void attention(ThreadPool& pool, const AttentionShape& shape, const float* q, int n, int pos,
               const float* k_cache, const float* v_cache, float* scratch, float* out,
               Isa isa = kernel_isa());

}  // namespace ffnskip::cpu
