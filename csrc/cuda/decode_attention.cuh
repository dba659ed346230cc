// Attention of one decode token over the KV cache, split along the cache length
// (flash-decoding): block (split, kv head) scores its share of the positions for every q head
// that reads this KV head, so each K/V row is read once; a combine kernel then merges the
// splits' partial softmax results. The grid is fixed for a given model and cache size, and
// the length comes from device memory, so one captured graph serves every position.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ffnskip::cuda {

constexpr int kMaxHeadDim = 256;

struct DecodeAttentionArgs {
  const float* q = nullptr;  // [num_heads * head_dim], rotated
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  const int32_t* pos = nullptr;  // device: position of the token; it attends to 0..pos
  int num_splits = 0;
  float* partial = nullptr;  // decode_attention_partial_floats() floats
  const int32_t* skip_flag = nullptr;  // device, optional: when set, the kernels do nothing
};

// Splits of the cache of max_seq_len positions: enough for several blocks per multiprocessor
// at full length, but none shorter than two rounds of keys (at a shorter length the splits past
// it are empty, their blocks return at once).
int decode_attention_splits(int num_heads, int num_kv_heads, int multiprocessors, int max_seq_len);
size_t decode_attention_partial_floats(int num_heads, int head_dim, int num_splits);

// k_cache, v_cache: [max_seq_len, num_kv_heads * head_dim] of one layer; out [num_heads *
// head_dim] in the storage type (the input of the output projection).
template <typename T>
void launch_decode_attention(const DecodeAttentionArgs& args, const T* k_cache, const T* v_cache,
                             T* out, cudaStream_t stream);

}  // namespace ffnskip::cuda
