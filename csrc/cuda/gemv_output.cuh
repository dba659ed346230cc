// What the GEMV kernels (gemv.cu, quant_gemv.cu) share: the block shape, and the epilogue that
// turns each lane's partial sums of a row into the output.
#pragma once

#include <stdexcept>

#include "common.cuh"
#include "gemv.cuh"
#include "norm.cuh"
#include "swiglu.cuh"

namespace ffnskip::cuda {

constexpr int kGemvWarpsPerBlock = 8;

// Rows a warp reads for one output: 2 for SwiGLU (gate row i and up row i, rows / 2 apart).
template <GemvOutput kOutput>
constexpr int kGemvRowsPerOutput = kOutput == GemvOutput::SwiGLU ? 2 : 1;

static_assert(kGemvWarpsPerBlock * kWarpSize == kRmsNormThreads,
              "the RMSNorm prologue sums in the norm kernel's order");

// The input row: a.x, or RMSNorm(a.norm_x) staged in the block's dynamic shared memory by every
// thread (call it before any warp leaves).
template <typename T>
__device__ __forceinline__ const T* gemv_input(const GemvArgs<T>& a) {
  if (a.norm_weight == nullptr) return a.x;
  extern __shared__ uint4 gemv_staged_input[];  // 16-byte aligned
  __shared__ float scratch[kWarpSize];
  T* staged = reinterpret_cast<T*>(gemv_staged_input);
  rmsnorm_row(a.norm_x, a.cols, a.norm_weight, a.norm_eps, staged, scratch);
  __syncthreads();
  return staged;
}

// The dynamic shared memory of a GEMV launch: the staged input, when the kernel norms it.
template <typename T>
size_t gemv_shared_bytes(const GemvArgs<T>& a) {
  if (a.norm_weight == nullptr) return 0;
  if (!gemv_folds_norm<T>(a.cols)) {
    throw std::invalid_argument("GEMV: a normed input of " + std::to_string(a.cols) +
                                " values does not fit in shared memory");
  }
  return (sizeof(T) * static_cast<size_t>(a.cols) + 15) / 16 * 16;
}

// The output of the calling warp (one per output; blocks of kGemvWarpsPerBlock warps).
__device__ __forceinline__ int gemv_output_index() {
  return blockIdx.x * kGemvWarpsPerBlock + threadIdx.x / kWarpSize;
}

// Sums the lanes' partial dot products of output `output`, adds the bias and writes the output
// (lane 0). Every lane of the warp calls it.
template <typename T, GemvOutput kOutput>
__device__ __forceinline__ void finish_gemv_output(const GemvArgs<T>& a, int output,
                                                   float (&acc)[kGemvRowsPerOutput<kOutput>]) {
  constexpr int kRows = kGemvRowsPerOutput<kOutput>;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    acc[r] = warp_sum(acc[r]);
    if (a.bias != nullptr) acc[r] += a.bias[output + r * (a.rows / kRows)];
  }
  if (threadIdx.x % kWarpSize != 0) return;
  if constexpr (kOutput == GemvOutput::Store) {
    a.y[output] = acc[0];
  } else if constexpr (kOutput == GemvOutput::Accumulate) {
    a.y[output] += acc[0];
  } else {
    a.act[output] = from_float<T>(silu_mul(acc[0], acc[1]));
  }
}

}  // namespace ffnskip::cuda
