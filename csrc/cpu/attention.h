// Causal grouped-query attention of n new query tokens over the KV cache of one layer.
#pragma once

#include <cstdint>

#include "../core/tensor_types.h"
#include "isa.h"
#include "thread_pool.h"

namespace ffnskip::cpu {

// The cache of a layer holds each KV head's positions contiguously: [num_kv_heads, positions,
// head_dim], heads kv_head_stride elements apart, so that attention streams each head's keys
// and values as one run of memory. Its elements are fp32, or fp16 bits (half the bytes to
// stream; the products and sums stay fp32).
struct AttentionShape {
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int64_t q_stride;        // floats between consecutive query rows
  int64_t kv_head_stride;  // cache elements between the caches of consecutive KV heads
  TensorType cache_type = TensorType::F32;  // F32 or F16
};

// Query t (absolute position pos + t) attends to cache positions 0 .. pos + t.
// out is [n, num_heads * head_dim]. Throws std::invalid_argument for another cache type.
void attention(ThreadPool& pool, const AttentionShape& shape, const float* q, int n, int pos,
               const void* k_cache, const void* v_cache, float* out, Isa isa = kernel_isa());

}  // namespace ffnskip::cpu
