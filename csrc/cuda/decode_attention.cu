#include "decode_attention.cuh"

#include <algorithm>

#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxHeadsPerBlock = 8;  // q heads of one KV head scored together
constexpr int kKeysPerRound = 32;     // positions scored per round of the online softmax
static_assert(kKeysPerRound == kWarpSize, "the softmax update gives each key of a round a lane");
constexpr int kDimsPerThread = kMaxHeadDim / kThreads;
// A split scores whole rounds, at least this many positions: fewer would cost more in blocks
// and partials than it gains in parallelism.
constexpr int kMinKeysPerSplit = 2 * kKeysPerRound;
// V rows read as 4 values per lane (16 bytes of fp32, 8 of fp16/bf16) when head_dim is a
// multiple of 4: lanes v_pack of `slot` take the keys slot, slot + slots, ... of a round, and the
// slots' sums are added in slot order at the end. Not 8 values of 16 bits: 64 accumulators for
// 8 heads, besides the scoring's q registers, would not fit the 128 registers per thread of
// kBlocksPerMultiprocessor blocks (ptxas reports spills).
constexpr int kVValues = 4;

bool vector_v(int head_dim) { return head_dim % kVValues == 0; }

// Blocks per multiprocessor the splits aim at when the cache is full (four warps each, at up
// to 128 registers per thread: one wave of the 64K-register file), so that more loads are in
// flight to stream K/V than with fewer, longer splits. An estimate, to be measured on a GPU.
constexpr int kBlocksPerMultiprocessor = 4;

// Per (head, split): head_dim unnormalised output values, then the running max, then the sum
// of exp(score - max).
__host__ __device__ int partial_stride(int head_dim) { return head_dim + 2; }

int heads_blocks(int group) { return ceil_div(group, kMaxHeadsPerBlock); }

// Key rows of head_dim values in T read as 16-byte packs, one lane per pack and 32 / packs keys
// per warp load, when the packs of a row divide the warp; else 0 (one value per lane and load).
template <typename T>
__device__ __forceinline__ int packs_per_key(int head_dim) {
  constexpr int kPack = Pack<T>::kCount;
  const int packs = head_dim / kPack;
  return head_dim % kPack == 0 && packs <= kWarpSize && kWarpSize % packs == 0 ? packs : 0;
}

// kVValues values of V from p (aligned to their size).
template <typename T>
__device__ __forceinline__ void load_v_values(const T* p, float (&out)[kVValues]) {
  if constexpr (sizeof(T) == 4) {
    static_assert(Pack<float>::kCount == kVValues, "fp32: one 16-byte pack");
    Pack<float>::widen(load_raw(p), out);
  } else {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVValues; ++i) out[i] = to_float(values[i]);
  }
}

// Block (split, y): KV head y / head_blocks, q heads [first_head, first_head + heads) of its
// group. Rounds of kKeysPerRound positions: (1) each warp scores some positions for all the
// heads, (2) one warp per head updates its running max and sum (a lane per position), (3)
// each thread updates its output values with the round's probabilities and V rows: kVValues
// of a subset of the round's keys (kVectorV), or one dimension of every key.
template <typename T, bool kVectorV>
__global__ void __launch_bounds__(kThreads, kBlocksPerMultiprocessor)
    decode_attention_split_kernel(const DecodeAttentionArgs a, const T* __restrict__ k_cache,
                                  const T* __restrict__ v_cache) {
  if (a.skip_flag != nullptr && *a.skip_flag != 0) return;
  __shared__ float q_s[kMaxHeadsPerBlock][kMaxHeadDim];
  __shared__ float p_s[kMaxHeadsPerBlock][kKeysPerRound];
  __shared__ float max_s[kMaxHeadsPerBlock];
  __shared__ float sum_s[kMaxHeadsPerBlock];
  __shared__ float corr_s[kMaxHeadsPerBlock];

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int hd = a.head_dim;
  const int kv_dim = a.num_kv_heads * hd;
  const int group = a.num_heads / a.num_kv_heads;
  const int head_blocks = ceil_div(group, kMaxHeadsPerBlock);
  const int kv_head = blockIdx.y / head_blocks;
  const int first_head = kv_head * group + (blockIdx.y % head_blocks) * kMaxHeadsPerBlock;
  const int heads = min(kMaxHeadsPerBlock, (kv_head + 1) * group - first_head);
  const int split = blockIdx.x;
  const int stride = partial_stride(hd);
  auto partial_of = [&](int g) {
    return a.partial + (static_cast<int64_t>(first_head + g) * a.num_splits + split) * stride;
  };

  const int len = *a.pos + 1;
  const int chunk =
      ceil_div(max(ceil_div(len, a.num_splits), kMinKeysPerSplit), kKeysPerRound) * kKeysPerRound;
  const int begin = split * chunk;
  const int end = min(len, begin + chunk);
  if (begin >= end) {  // nothing to attend to in this split: the combine reads only its max
    if (tid < heads) partial_of(tid)[hd] = -INFINITY;
    return;
  }

  for (int i = tid; i < heads * hd; i += kThreads) {
    q_s[i / hd][i % hd] = a.q[static_cast<int64_t>(first_head + i / hd) * hd + i % hd];
  }
  if (tid < heads) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.0f;
  }
  __syncthreads();

  const float scale = 1.0f / sqrtf(static_cast<float>(hd));
  const T* k_base = k_cache + kv_head * hd;
  const T* v_base = v_cache + kv_head * hd;
  // Packed scoring: lane l reads pack l % packs of key l / packs (its q values from shared
  // memory: with the V accumulators, registers for them too would spill).
  constexpr int kPack = Pack<T>::kCount;
  const int packs = packs_per_key<T>(hd);
  const int keys_per_load = packs > 0 ? kWarpSize / packs : 1;
  const int pack = packs > 0 ? lane % packs : 0;
  constexpr int kAccValues = kVectorV ? kVValues : kDimsPerThread;
  float acc[kMaxHeadsPerBlock][kAccValues] = {};
  const int v_packs = kVectorV ? hd / kVValues : 1;
  const int slots = kThreads / v_packs;  // at least 2: head_dim <= kMaxHeadDim
  const int v_pack = tid % v_packs;
  const int slot = tid / v_packs;  // slots and above: no V work
  for (int k0 = begin; k0 < end; k0 += kKeysPerRound) {
    const int keys = min(kKeysPerRound, end - k0);
    for (int j0 = warp * keys_per_load; j0 < keys; j0 += kWarps * keys_per_load) {
      float dot[kMaxHeadsPerBlock] = {};
      int j = j0;
      if (packs > 0) {
        j += lane / packs;
        if (j < keys) {
          float kv[kPack];
          load_pack(k_base + static_cast<int64_t>(k0 + j) * kv_dim + pack * kPack, kv);
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
#pragma unroll
            for (int i = 0; i < kPack; ++i) dot[g] += q_s[g][pack * kPack + i] * kv[i];
          }
        }
      } else {
        const T* k = k_base + static_cast<int64_t>(k0 + j) * kv_dim;
        for (int d = lane; d < hd; d += kWarpSize) {
          const float kd = to_float(k[d]);
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
            if (g < heads) dot[g] += q_s[g][d] * kd;
          }
        }
      }
      const int lanes_per_key = packs > 0 ? packs : kWarpSize;
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g < heads) {  // `heads` is the same for the whole block: all lanes reduce
          float score = dot[g];
          for (int offset = lanes_per_key / 2; offset > 0; offset /= 2) {
            score += __shfl_xor_sync(kFullMask, score, offset);  // within a key's lanes
          }
          if (lane % lanes_per_key == 0 && j < keys) p_s[g][j] = score * scale;
        }
      }
    }
    __syncthreads();
    for (int g = warp; g < heads; g += kWarps) {  // one warp per head, one lane per position
      const float score = lane < keys ? p_s[g][lane] : -INFINITY;
      const float old_max = max_s[g];
      const float new_max = fmaxf(old_max, warp_max(score));
      const float p = lane < keys ? expf(score - new_max) : 0.0f;
      p_s[g][lane] = p;
      const float sum = warp_sum(p);
      if (lane == 0) {
        const float corr = expf(old_max - new_max);  // 0 in the first round (old_max = -inf)
        sum_s[g] = sum_s[g] * corr + sum;
        max_s[g] = new_max;
        corr_s[g] = corr;
      }
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
#pragma unroll
      for (int e = 0; e < kAccValues; ++e) {
        if (g < heads) acc[g][e] *= corr_s[g];
      }
    }
    if constexpr (kVectorV) {
      for (int j = slot; j < keys && slot < slots; j += slots) {
        float vv[kVValues];
        load_v_values(v_base + static_cast<int64_t>(k0 + j) * kv_dim + v_pack * kVValues, vv);
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
          if (g < heads) {
            const float p = p_s[g][j];
#pragma unroll
            for (int e = 0; e < kVValues; ++e) acc[g][e] += p * vv[e];
          }
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < kDimsPerThread; ++e) {
        const int d = tid + e * kThreads;
        if (d >= hd) continue;
        for (int j = 0; j < keys; ++j) {
          const float vd = to_float(v_base[static_cast<int64_t>(k0 + j) * kv_dim + d]);
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
            if (g < heads) acc[g][e] += p_s[g][j] * vd;
          }
        }
      }
    }
    __syncthreads();  // p_s and corr_s are rewritten by the next round
  }

  if constexpr (kVectorV) {
    // [head * kVValues + value][thread]: conflict-free stores; then output (g, d) adds its
    // slots' sums in slot order.
    __shared__ float slot_sums[kMaxHeadsPerBlock * kVValues][kThreads];
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
#pragma unroll
      for (int e = 0; e < kVValues; ++e) {
        if (g < heads) slot_sums[g * kVValues + e][tid] = acc[g][e];
      }
    }
    __syncthreads();
    for (int i = tid; i < heads * hd; i += kThreads) {
      const int g = i / hd, d = i % hd;
      const float* sums = slot_sums[g * kVValues + d % kVValues] + d / kVValues;
      float o = 0.0f;
      for (int s = 0; s < slots; ++s) o += sums[s * v_packs];
      partial_of(g)[d] = o;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kDimsPerThread; ++e) {
      const int d = tid + e * kThreads;
      if (d >= hd) continue;
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g < heads) partial_of(g)[d] = acc[g][e];
      }
    }
  }
  if (tid < heads) {
    partial_of(tid)[hd] = max_s[tid];
    partial_of(tid)[hd + 1] = sum_s[tid];
  }
}

// One block per q head: out = sum_s w_s o_s / sum_s w_s l_s with w_s = exp(max_s - max).
template <typename T>
__global__ void decode_attention_combine_kernel(const DecodeAttentionArgs a, T* __restrict__ out) {
  if (a.skip_flag != nullptr && *a.skip_flag != 0) return;
  const int h = blockIdx.x;
  const int hd = a.head_dim;
  const int stride = partial_stride(hd);
  const float* part = a.partial + static_cast<int64_t>(h) * a.num_splits * stride;
  float max_all = -INFINITY;  // finite: split 0 always holds position 0
  for (int s = 0; s < a.num_splits; ++s) max_all = fmaxf(max_all, part[s * stride + hd]);
  float total = 0.0f;
  for (int s = 0; s < a.num_splits; ++s) {
    const float m = part[s * stride + hd];
    if (m != -INFINITY) total += expf(m - max_all) * part[s * stride + hd + 1];
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < a.num_splits; ++s) {
      const float m = part[s * stride + hd];
      if (m != -INFINITY) o += expf(m - max_all) * part[s * stride + d];
    }
    out[static_cast<int64_t>(h) * hd + d] = from_float<T>(o / total);
  }
}

}  // namespace

int decode_attention_splits(int num_heads, int num_kv_heads, int multiprocessors,
                            int max_seq_len) {
  const int blocks_per_split = num_kv_heads * heads_blocks(num_heads / num_kv_heads);
  const int splits = ceil_div(kBlocksPerMultiprocessor * multiprocessors, blocks_per_split);
  return std::max(1, std::min(splits, ceil_div(max_seq_len, kMinKeysPerSplit)));
}

size_t decode_attention_partial_floats(int num_heads, int head_dim, int num_splits) {
  return static_cast<size_t>(num_heads) * num_splits * partial_stride(head_dim);
}

template <typename T>
void launch_decode_attention(const DecodeAttentionArgs& args, const T* k_cache, const T* v_cache,
                             T* out, cudaStream_t stream) {
  const int head_blocks = heads_blocks(args.num_heads / args.num_kv_heads);
  const dim3 grid(args.num_splits, args.num_kv_heads * head_blocks);
  if (vector_v(args.head_dim)) {
    decode_attention_split_kernel<T, true><<<grid, kThreads, 0, stream>>>(args, k_cache, v_cache);
  } else {
    decode_attention_split_kernel<T, false><<<grid, kThreads, 0, stream>>>(args, k_cache, v_cache);
  }
  CUDA_CHECK_LAUNCH();
  decode_attention_combine_kernel<T><<<args.num_heads, kThreads, 0, stream>>>(args, out);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T)                                                              \
  template void launch_decode_attention<T>(const DecodeAttentionArgs&, const T*, const T*, T*, \
                                           cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
