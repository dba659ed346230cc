#include "prefill_attention.cuh"

#include "common.cuh"
#include "cuda_check.cuh"
#include "decode_attention.cuh"  // kMaxHeadDim

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kQueriesPerWarp = 4;
constexpr int kQueriesPerBlock = kWarps * kQueriesPerWarp;
constexpr int kKeysPerTile = kWarpSize;  // lane j scores position k0 + j
constexpr int kDimsPerLane = kMaxHeadDim / kWarpSize;
constexpr size_t kDefaultSharedLimit = 48 * 1024;

// Shared memory: K tile [kKeysPerTile][head_dim + 1] (padded so that lanes reading different
// rows hit different banks), V tile [kKeysPerTile][head_dim], queries [kQueriesPerBlock][head_dim].
size_t shared_bytes(int head_dim) {
  return sizeof(float) * (static_cast<size_t>(kKeysPerTile) * (head_dim + 1) +
                          static_cast<size_t>(kKeysPerTile) * head_dim +
                          static_cast<size_t>(kQueriesPerBlock) * head_dim);
}

// Block (query tile x, head y); warp w owns queries w * kQueriesPerWarp + [0, kQueriesPerWarp)
// of the tile. Per K/V tile and query: lane j computes the score of position k0 + j, the warp
// updates the running max and sum, and lane l accumulates dimensions l, l + 32, ...
template <typename T>
__global__ void __launch_bounds__(kThreads)
    prefill_attention_kernel(const PrefillAttentionArgs a, const T* __restrict__ k_cache,
                             const T* __restrict__ v_cache, T* __restrict__ out) {
  extern __shared__ float smem[];
  const int hd = a.head_dim;
  float* k_s = smem;
  float* v_s = k_s + kKeysPerTile * (hd + 1);
  float* q_s = v_s + kKeysPerTile * hd;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int h = blockIdx.y;
  const int kv_head = h / (a.num_heads / a.num_kv_heads);
  const int kv_dim = a.num_kv_heads * hd;
  const int t0 = blockIdx.x * kQueriesPerBlock;
  const int pos = *a.pos;
  const float scale = 1.0f / sqrtf(static_cast<float>(hd));

  for (int i = tid; i < kQueriesPerBlock * hd; i += kThreads) {
    const int t = t0 + i / hd;
    q_s[i] = t < a.n ? a.qkv[static_cast<int64_t>(t) * a.qkv_stride + h * hd + i % hd] : 0.0f;
  }

  float running_max[kQueriesPerWarp];
  float running_sum[kQueriesPerWarp];
  float acc[kQueriesPerWarp][kDimsPerLane];
#pragma unroll
  for (int qi = 0; qi < kQueriesPerWarp; ++qi) {
    running_max[qi] = -INFINITY;
    running_sum[qi] = 0.0f;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) acc[qi][e] = 0.0f;
  }

  const int last_key = pos + min(a.n, t0 + kQueriesPerBlock) - 1;  // seen by the last query
  const T* k_base = k_cache + kv_head * hd;
  const T* v_base = v_cache + kv_head * hd;
  for (int k0 = 0; k0 <= last_key; k0 += kKeysPerTile) {
    __syncthreads();  // the previous tile is consumed (the first time: q_s is complete)
    for (int i = tid; i < kKeysPerTile * hd; i += kThreads) {
      const int j = i / hd;
      const int d = i % hd;
      const int key = k0 + j;
      const bool valid = key <= last_key;
      const int64_t offset = static_cast<int64_t>(key) * kv_dim + d;
      k_s[j * (hd + 1) + d] = valid ? to_float(k_base[offset]) : 0.0f;
      v_s[j * hd + d] = valid ? to_float(v_base[offset]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int qi = 0; qi < kQueriesPerWarp; ++qi) {
      const int local = warp * kQueriesPerWarp + qi;
      const int t = t0 + local;
      const int limit = pos + t;  // last position this query sees
      // Both conditions are the same for the whole warp; when neither holds, position k0
      // (lane 0) is visible, so the tile's max below is finite.
      if (t >= a.n || k0 > limit) continue;
      const int key = k0 + lane;
      float score = -INFINITY;
      if (key <= limit) {
        const float* qv = q_s + local * hd;
        const float* kv = k_s + lane * (hd + 1);
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) dot += qv[d] * kv[d];
        score = dot * scale;
      }
      const float new_max = fmaxf(running_max[qi], warp_max(score));
      const float corr = expf(running_max[qi] - new_max);  // 0 on the first visible tile
      const float p = key <= limit ? expf(score - new_max) : 0.0f;
      running_sum[qi] = running_sum[qi] * corr + warp_sum(p);
      running_max[qi] = new_max;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) acc[qi][e] *= corr;
      for (int j = 0; j < kKeysPerTile; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) {
          const int d = lane + e * kWarpSize;
          if (d < hd) acc[qi][e] += pj * v_s[j * hd + d];
        }
      }
    }
  }

  const int q_dim = a.num_heads * hd;
#pragma unroll
  for (int qi = 0; qi < kQueriesPerWarp; ++qi) {
    const int t = t0 + warp * kQueriesPerWarp + qi;
    if (t >= a.n) continue;
    T* dst = out + static_cast<int64_t>(t) * q_dim + h * hd;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) {
      const int d = lane + e * kWarpSize;
      if (d < hd) dst[d] = from_float<T>(acc[qi][e] / running_sum[qi]);
    }
  }
}

}  // namespace

template <typename T>
void launch_prefill_attention(const PrefillAttentionArgs& args, const T* k_cache,
                              const T* v_cache, T* out, cudaStream_t stream) {
  const size_t shared = shared_bytes(args.head_dim);
  if (shared > kDefaultSharedLimit) {  // head_dim > 128: opt in to the larger carve-out
    CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_kernel<T>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(shared)));
  }
  const dim3 grid(ceil_div(args.n, kQueriesPerBlock), args.num_heads);
  prefill_attention_kernel<T><<<grid, kThreads, shared, stream>>>(args, k_cache, v_cache, out);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T)                                                        \
  template void launch_prefill_attention<T>(const PrefillAttentionArgs&, const T*, const T*, \
                                            T*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
