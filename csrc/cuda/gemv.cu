#include "gemv.cuh"

#include "common.cuh"
#include "cuda_check.cuh"
#include "gemv_output.cuh"
#include "quant_gemv.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kUnroll = 4;  // 16-byte loads in flight per lane and row

// Warp w of block b computes output b * kGemvWarpsPerBlock + w from kRows weight rows (2 for
// SwiGLU and RopeKv: gemv_weight_row). Lane l
// reads the 16-byte packs l, l + 32, ... of the rows and of x, so each warp load is 512
// contiguous bytes.
template <typename T, GemvOutput kOutput>
__global__ void __launch_bounds__(kGemvWarpsPerBlock * kWarpSize)
    gemv_kernel(const GemvArgs<T> a) {
  if (a.skip_flag != nullptr && *a.skip_flag != 0) return;
  const T* __restrict__ x = gemv_input(a);
  constexpr int kRows = kGemvRowsPerOutput<kOutput>;
  constexpr int kPack = Pack<T>::kCount;
  const int lane = threadIdx.x % kWarpSize;
  const int output = gemv_output_index();
  if (output >= a.rows / kRows) return;  // whole warps leave together
  const T* w[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    w[r] = static_cast<const T*>(a.weight) +
           static_cast<int64_t>(gemv_weight_row<kOutput>(a, output, r)) * a.cols;
  }

  float acc[kRows] = {};
  if (a.cols % kPack == 0) {
    const int packs = a.cols / kPack;
    int p = lane;
    // kUnroll packs per lane and row at a time, every load issued before the arithmetic.
    for (; p + (kUnroll - 1) * kWarpSize < packs; p += kUnroll * kWarpSize) {
      uint4 x_raw[kUnroll];
      uint4 w_raw[kRows][kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int offset = (p + u * kWarpSize) * kPack;
        x_raw[u] = load_raw_anywhere(x + offset);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          w_raw[r][u] = load_raw(w[r] + offset);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float xv[kPack];
        Pack<T>::widen(x_raw[u], xv);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float wv[kPack];
          Pack<T>::widen(w_raw[r][u], wv);
#pragma unroll
          for (int i = 0; i < kPack; ++i) acc[r] += wv[i] * xv[i];
        }
      }
    }
    for (; p < packs; p += kWarpSize) {  // the last packs of the row
      float xv[kPack];
      Pack<T>::widen(load_raw_anywhere(x + p * kPack), xv);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float wv[kPack];
        load_pack(w[r] + p * kPack, wv);
#pragma unroll
        for (int i = 0; i < kPack; ++i) acc[r] += wv[i] * xv[i];
      }
    }
  } else {  // rows not made of whole packs (odd shapes): element by element
    for (int c = lane; c < a.cols; c += kWarpSize) {
      const float xv = to_float(x[c]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        acc[r] += to_float(w[r][c]) * xv;
      }
    }
  }
  finish_gemv_output<T, kOutput>(a, output, acc);
}

}  // namespace

template <typename T>
void launch_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream) {
  if (args.weight_type != dense_tensor_type<T>()) {
    launch_quant_gemv(args, output, stream);
    return;
  }
  const GemvLaunch l = gemv_launch(args, output, gemv_staged_bytes(args));
  switch (output) {
    case GemvOutput::Store:
      gemv_kernel<T, GemvOutput::Store><<<l.grid, l.block, l.shared_bytes, stream>>>(args);
      break;
    case GemvOutput::Accumulate:
      gemv_kernel<T, GemvOutput::Accumulate><<<l.grid, l.block, l.shared_bytes, stream>>>(args);
      break;
    case GemvOutput::SwiGLU:
      gemv_kernel<T, GemvOutput::SwiGLU><<<l.grid, l.block, l.shared_bytes, stream>>>(args);
      break;
    case GemvOutput::RopeKv:
      gemv_kernel<T, GemvOutput::RopeKv><<<l.grid, l.block, l.shared_bytes, stream>>>(args);
      break;
  }
  CUDA_CHECK_LAUNCH();
}

#define FFNSKIP_INSTANTIATE(T) \
  template void launch_gemv<T>(const GemvArgs<T>&, GemvOutput, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
