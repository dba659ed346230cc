// Causal attention of the n tokens of a prefill pass over the KV cache (which already holds
// their own K/V): token t at position pos + t attends to positions 0..pos + t. Tiled: a block
// takes 16 queries of one head and walks the cache in tiles of 32 positions staged in shared
// memory, with an online softmax per query. Correctness first; no tensor cores.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffnskip::cuda {

struct PrefillAttentionArgs {
  const float* qkv = nullptr;  // q of token t, head h at qkv[t * qkv_stride + h * head_dim]
  int qkv_stride = 0;
  int n = 0;
  const int32_t* pos = nullptr;  // device: position of token 0
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // at most kMaxHeadDim
};

// k_cache, v_cache: [max_seq_len, num_kv_heads * head_dim] of one layer; out [n, num_heads *
// head_dim] in the storage type.
template <typename T>
void launch_prefill_attention(const PrefillAttentionArgs& args, const T* k_cache,
                              const T* v_cache, T* out, cudaStream_t stream);

}  // namespace ffnskip::cuda
