// What the GEMV kernels (gemv.cu, quant_gemv.cu) share: the launch shape, the rows a warp
// reads, the RMSNorm prologue, and the epilogue that turns each lane's partial sums into the
// output.
#pragma once

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "gemv.cuh"
#include "norm.cuh"
#include "rope.cuh"
#include "swiglu.cuh"

namespace ffnskip::cuda {

constexpr int kGemvWarpsPerBlock = 8;

// Rows a warp reads for one output: 2 for SwiGLU (gate row i and up row i, rows / 2 apart)
// and for RopeKv (the two elements of a head that turn together).
constexpr bool gemv_reads_row_pairs(GemvOutput output) {
  return output == GemvOutput::SwiGLU || output == GemvOutput::RopeKv;
}
template <GemvOutput kOutput>
constexpr int kGemvRowsPerOutput = gemv_reads_row_pairs(kOutput) ? 2 : 1;

static_assert(kGemvWarpsPerBlock * kWarpSize == kRmsNormThreads,
              "the RMSNorm prologue sums in the norm kernel's order");

// The grid, block and dynamic shared memory of a launch whose kernel stages its input in
// `input_bytes` of shared memory (0: it reads x in place); throws std::invalid_argument for
// arguments the output mode cannot take and for an input too wide to stage.
struct GemvLaunch {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
};

template <typename T>
GemvLaunch gemv_launch(const GemvArgs<T>& a, GemvOutput output, size_t input_bytes) {
  if (output == GemvOutput::RopeKv) {
    const RopeKvLayout& l = a.rope;
    if (l.head_dim <= 0 || l.head_dim % 2 != 0 || a.first_row % l.head_dim != 0 ||
        a.rows % l.head_dim != 0 || a.first_row + a.rows > l.stack() || l.pos == nullptr ||
        l.inv_freq == nullptr) {
      throw std::invalid_argument("GEMV: RoPE rows must be whole heads of the q/k/v stack");
    }
  }
  if (input_bytes > kGemvStagedInputBytes) {
    throw std::invalid_argument("GEMV: an input of " + std::to_string(a.cols) + " values (" +
                                std::to_string(input_bytes) +
                                " bytes staged) does not fit in shared memory");
  }
  GemvLaunch launch;
  const int outputs = gemv_reads_row_pairs(output) ? a.rows / 2 : a.rows;
  launch.grid = dim3(ceil_div(outputs, kGemvWarpsPerBlock));
  launch.block = dim3(kGemvWarpsPerBlock * kWarpSize);
  launch.shared_bytes = input_bytes;
  return launch;
}

// The output of the calling warp (one per output; blocks of kGemvWarpsPerBlock warps).
__device__ __forceinline__ int gemv_output_index() {
  return blockIdx.x * kGemvWarpsPerBlock + threadIdx.x / kWarpSize;
}

// The weight row (and bias index) of row r < kGemvRowsPerOutput of output `output`.
template <GemvOutput kOutput, typename T>
__device__ __forceinline__ int gemv_weight_row(const GemvArgs<T>& a, int output, int r) {
  if constexpr (kOutput == GemvOutput::SwiGLU) {
    return output + r * (a.rows / 2);
  } else if constexpr (kOutput == GemvOutput::RopeKv) {  // pair output % half of head output / half
    const int half = a.rope.head_dim / 2;
    int i0, i1;
    rope_pair(output % half, a.rope.head_dim, a.rope.interleaved, i0, i1);
    return output / half * a.rope.head_dim + (r == 0 ? i0 : i1);
  } else {
    return output;
  }
}

// The shared memory the dense GEMV stages its input in: the RMSNorm prologue's row.
template <typename T>
size_t gemv_staged_bytes(const GemvArgs<T>& a) {
  return a.norm_weight != nullptr ? (sizeof(T) * static_cast<size_t>(a.cols) + 15) / 16 * 16 : 0;
}

// The dense GEMV's input row: a.x, or RMSNorm(a.norm_x) staged in the block's dynamic shared
// memory by every thread (call it before any warp leaves).
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

// Sums the lanes' partial dot products of output `output`, adds the bias and writes the output
// (lane 0). Every lane of the warp calls it.
template <typename T, GemvOutput kOutput>
__device__ __forceinline__ void finish_gemv_output(const GemvArgs<T>& a, int output,
                                                   float (&acc)[kGemvRowsPerOutput<kOutput>]) {
  constexpr int kRows = kGemvRowsPerOutput<kOutput>;
  int rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    rows[r] = gemv_weight_row<kOutput>(a, output, r);
    acc[r] = warp_sum(acc[r]);
    if (a.bias != nullptr) acc[r] += a.bias[rows[r]];
  }
  if (threadIdx.x % kWarpSize != 0) return;
  if constexpr (kOutput == GemvOutput::Store) {
    a.y[output] = acc[0];
  } else if constexpr (kOutput == GemvOutput::Accumulate) {
    a.y[output] += acc[0];
  } else if constexpr (kOutput == GemvOutput::SwiGLU) {
    a.act[output] = from_float<T>(silu_mul(acc[0], acc[1]));
  } else {  // RopeKv: q, k or v by the rows' place in the stack
    const RopeKvLayout& l = a.rope;
    const int stack_row = a.first_row + rows[0];  // rows[1] is in the same head
    const int position = *l.pos;
    T* const cache_row = (stack_row < l.q_dim + l.kv_dim ? a.k_cache : a.v_cache) +
                         static_cast<int64_t>(position) * l.kv_dim;
    if (stack_row >= l.q_dim + l.kv_dim) {  // v, as is
      const int v0 = a.first_row - l.q_dim - l.kv_dim;  // the segment's first v column
      cache_row[v0 + rows[0]] = from_float<T>(acc[0]);
      cache_row[v0 + rows[1]] = from_float<T>(acc[1]);
      return;
    }
    float y0, y1;
    rope_rotate(acc[0], acc[1], l.inv_freq[output % (l.head_dim / 2)], position, y0, y1);
    if (stack_row < l.q_dim) {
      a.y[rows[0]] = y0;
      a.y[rows[1]] = y1;
    } else {
      const int k0 = a.first_row - l.q_dim;  // the segment's first k column
      cache_row[k0 + rows[0]] = from_float<T>(y0);
      cache_row[k0 + rows[1]] = from_float<T>(y1);
    }
  }
}

}  // namespace ffnskip::cuda
