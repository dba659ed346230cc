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
constexpr int kDimsPerThread = kMaxHeadDim / kThreads;

// Per (head, split): head_dim unnormalised output values, then the running max, then the sum
// of exp(score - max).
__host__ __device__ int partial_stride(int head_dim) { return head_dim + 2; }

int heads_blocks(int group) { return ceil_div(group, kMaxHeadsPerBlock); }

// Block (split, y): KV head y / head_blocks, q heads [first_head, first_head + heads) of its
// group. Rounds of kKeysPerRound positions: (1) each warp scores some positions for all the
// heads, (2) one thread per head updates its running max and sum, (3) each thread updates its
// output dimensions with the round's probabilities and V rows.
template <typename T>
__global__ void __launch_bounds__(kThreads)
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
  const int chunk = ceil_div(len, a.num_splits);
  const int begin = split * chunk;
  const int end = min(len, begin + chunk);
  if (begin >= end) {  // nothing to attend to in this split: weight zero in the combine
    for (int i = tid; i < heads * stride; i += kThreads) {
      partial_of(i / stride)[i % stride] = i % stride == hd ? -INFINITY : 0.0f;
    }
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
  float acc[kMaxHeadsPerBlock][kDimsPerThread] = {};
  for (int k0 = begin; k0 < end; k0 += kKeysPerRound) {
    const int keys = min(kKeysPerRound, end - k0);
    for (int j = warp; j < keys; j += kWarps) {
      const T* k = k_base + static_cast<int64_t>(k0 + j) * kv_dim;
      float dot[kMaxHeadsPerBlock] = {};
      for (int d = lane; d < hd; d += kWarpSize) {
        const float kd = to_float(k[d]);
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
          if (g < heads) dot[g] += q_s[g][d] * kd;
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g < heads) {  // `heads` is the same for the whole block: all lanes reduce
          const float score = warp_sum(dot[g]);
          if (lane == 0) p_s[g][j] = score * scale;
        }
      }
    }
    __syncthreads();
    if (tid < heads) {
      float* p = p_s[tid];
      const float old_max = max_s[tid];
      float new_max = old_max;
      for (int j = 0; j < keys; ++j) new_max = fmaxf(new_max, p[j]);
      float sum = 0.0f;
      for (int j = 0; j < keys; ++j) {
        p[j] = expf(p[j] - new_max);
        sum += p[j];
      }
      const float corr = expf(old_max - new_max);  // 0 in the first round (old_max = -inf)
      sum_s[tid] = sum_s[tid] * corr + sum;
      max_s[tid] = new_max;
      corr_s[tid] = corr;
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kDimsPerThread; ++e) {
      const int d = tid + e * kThreads;
      if (d >= hd) continue;
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g < heads) acc[g][e] *= corr_s[g];
      }
      for (int j = 0; j < keys; ++j) {
        const float vd = to_float(v_base[static_cast<int64_t>(k0 + j) * kv_dim + d]);
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
          if (g < heads) acc[g][e] += p_s[g][j] * vd;
        }
      }
    }
    __syncthreads();  // p_s and corr_s are rewritten by the next round
  }

#pragma unroll
  for (int e = 0; e < kDimsPerThread; ++e) {
    const int d = tid + e * kThreads;
    if (d >= hd) continue;
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
      if (g < heads) partial_of(g)[d] = acc[g][e];
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
  const int splits = ceil_div(2 * multiprocessors, blocks_per_split);
  const int64_t rounds = (static_cast<int64_t>(max_seq_len) + kKeysPerRound - 1) / kKeysPerRound;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, rounds)));
}

size_t decode_attention_partial_floats(int num_heads, int head_dim, int num_splits) {
  return static_cast<size_t>(num_heads) * num_splits * partial_stride(head_dim);
}

template <typename T>
void launch_decode_attention(const DecodeAttentionArgs& args, const T* k_cache, const T* v_cache,
                             T* out, cudaStream_t stream) {
  const int head_blocks = heads_blocks(args.num_heads / args.num_kv_heads);
  const dim3 grid(args.num_splits, args.num_kv_heads * head_blocks);
  decode_attention_split_kernel<T><<<grid, kThreads, 0, stream>>>(args, k_cache, v_cache);
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
