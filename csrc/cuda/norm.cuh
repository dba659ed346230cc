// RMSNorm of fp32 rows into the storage type the linears read:
// out[t, i] = weight[i] * (x[t, i] / sqrt(mean_i(x[t, :]^2) + eps)), the CPU backend's order.
// The residual adds themselves are fused into the projections that produce them (GEMV
// Accumulate epilogue, GEMM beta = 1) and into the score kernel, so no pass adds rows alone.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"
#include "ffn_gate.cuh"

namespace ffnskip::cuda {

// 1 / sqrt(mean(row^2) + eps) of one fp32 row, reduced over the block (every thread gets it):
// the RMSNorm kernels' and FiRST's router's (which normalises the rows itself), one arithmetic.
__device__ __forceinline__ float row_inv_rms(const float* __restrict__ row, int dim, float eps,
                                             float* scratch) {
  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum_sq += row[i] * row[i];
  sum_sq = block_sum(sum_sq, scratch);
  return 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
}

// Threads of the norm kernels' blocks. A GEMV that opens with the norm (gemv.cuh) runs blocks of
// as many threads, so its sum of squares adds in the same order: its input equals the norm
// kernel's output bit for bit.
constexpr int kRmsNormThreads = 256;

// dst = RMSNorm of one fp32 row, rounded to T, by the whole block.
template <typename T>
__device__ __forceinline__ void rmsnorm_row(const float* __restrict__ row, int dim,
                                            const float* __restrict__ weight, float eps,
                                            T* __restrict__ dst, float* scratch) {
  const float inv_rms = row_inv_rms(row, dim, eps, scratch);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    dst[i] = from_float<T>(weight[i] * (row[i] * inv_rms));
  }
}

// x [n, dim] fp32, weight [dim] fp32, out [n, dim].
template <typename T>
void launch_rmsnorm(const float* x, int n, int dim, const float* weight, float eps, T* out,
                    cudaStream_t stream);

// The RMSNorm of one row (a decode step) that opens a gated FFN: its thread 0 first decides
// the FFN (decide_ffn); when it is skipped, the kernel returns without writing `out`.
template <typename T>
void launch_gated_rmsnorm(const float* x, int dim, const float* weight, float eps, T* out,
                          const FfnGate& gate, cudaStream_t stream);

}  // namespace ffnskip::cuda
