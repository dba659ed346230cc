#include "rope.cuh"

#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 256;

// Block column y is token t; the x dimension covers, in order: the (q head, i) rotations,
// the (k head, i) rotations and the v elements of that token.
template <typename T>
__global__ void rope_kv_write_kernel(const RopeKvArgs a, T* __restrict__ k_cache,
                                     T* __restrict__ v_cache) {
  if (a.skip_flag != nullptr && *a.skip_flag != 0) return;
  const RopeKvLayout& l = a.layout;
  const int t = blockIdx.y;
  const int half = l.head_dim / 2;
  const int kv_dim = l.kv_dim;
  const int q_items = a.q_heads * half;
  const int k_items = l.kv_heads() * half;
  const int item = blockIdx.x * blockDim.x + threadIdx.x;
  if (item >= q_items + k_items + kv_dim) return;

  const int position = *l.pos + t;
  float* row = a.qkv + static_cast<int64_t>(t) * l.stack();
  const int64_t cache_row = static_cast<int64_t>(position) * kv_dim;
  if (item >= q_items + k_items) {  // v: copied as is
    const int j = item - q_items - k_items;
    v_cache[cache_row + j] = from_float<T>(row[l.q_dim + kv_dim + j]);
    return;
  }
  const bool is_q = item < q_items;
  const int rel = is_q ? item : item - q_items;
  const int head = rel / half;
  const int i = rel % half;
  float* v = row + (is_q ? 0 : l.q_dim) + head * l.head_dim;
  int i0, i1;
  rope_pair(i, l.head_dim, l.interleaved, i0, i1);
  float y0, y1;
  rope_rotate(v[i0], v[i1], l.inv_freq[i], position, y0, y1);
  if (is_q) {
    v[i0] = y0;
    v[i1] = y1;
  } else {
    T* k = k_cache + cache_row + head * l.head_dim;
    k[i0] = from_float<T>(y0);
    k[i1] = from_float<T>(y1);
  }
}

}  // namespace

template <typename T>
void launch_rope_kv_write(const RopeKvArgs& args, T* k_cache, T* v_cache, cudaStream_t stream) {
  const RopeKvLayout& l = args.layout;
  const int half = l.head_dim / 2;
  const int items = (args.q_heads + l.kv_heads()) * half + l.kv_dim;
  const dim3 grid(ceil_div(items, kThreads), args.n);
  rope_kv_write_kernel<T><<<grid, kThreads, 0, stream>>>(args, k_cache, v_cache);
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T) \
  template void launch_rope_kv_write<T>(const RopeKvArgs&, T*, T*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
