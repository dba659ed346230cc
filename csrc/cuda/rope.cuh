// Rotary position embedding (rotate-half, or adjacent pairs for llama.cpp's row order) fused
// with the KV-cache write: for each token t of
// the pass, at position pos + t, rotates its q heads in place and writes its rotated k heads
// and its v heads to the layer's cache in the storage type.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffnskip::cuda {

// A pass's [q; k; v] rows (q at column 0, k at q_dim, v at q_dim + kv_dim) and how they turn:
// what the RoPE kernel and the QKV GEMV's epilogue (gemv.cuh RopeKv) both take, set up once.
struct RopeKvLayout {
  int q_dim = 0;
  int kv_dim = 0;
  int head_dim = 0;
  const int32_t* pos = nullptr;     // device: position of the pass's first token
  const float* inv_freq = nullptr;  // [head_dim / 2]; angle = inv_freq[i] * float(position)
  bool interleaved = false;  // rows in llama.cpp's order: pairs (2i, 2i + 1) turn together

  __host__ __device__ int stack() const { return q_dim + 2 * kv_dim; }
  __host__ __device__ int kv_heads() const { return kv_dim / head_dim; }
};

struct RopeKvArgs {
  float* qkv = nullptr;  // [n, layout.stack()]
  int n = 0;
  int q_heads = 0;  // q heads to rotate; 0 writes K/V only
  RopeKvLayout layout;
  const int32_t* skip_flag = nullptr;  // device, optional: when set, the kernel does nothing
};

// The two elements of a head that turn together, for pair i < head_dim / 2: i with i + half,
// or in interleaved rows 2i with 2i + 1 (the CPU backend's).
__host__ __device__ __forceinline__ void rope_pair(int i, int head_dim, bool interleaved,
                                                   int& i0, int& i1) {
  i0 = interleaved ? 2 * i : i;
  i1 = interleaved ? 2 * i + 1 : i + head_dim / 2;
}

// (x0, x1) turned by pair i's angle at `position`: the fp32 angle as transformers computes it
// (inv_freq @ position_ids in float32), products and sums rounded one by one (no contraction),
// so that this kernel and the QKV GEMV's epilogue (gemv.cuh) agree bit for bit.
__device__ __forceinline__ void rope_rotate(float x0, float x1, float inv_freq, int position,
                                            float& y0, float& y1) {
  const float angle = inv_freq * static_cast<float>(position);
  const float c = cosf(angle);
  const float s = sinf(angle);
  y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
  y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}

// k_cache, v_cache: [max_seq_len, kv_heads * head_dim] of one layer.
template <typename T>
void launch_rope_kv_write(const RopeKvArgs& args, T* k_cache, T* v_cache, cudaStream_t stream);

}  // namespace ffnskip::cuda
