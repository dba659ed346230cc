#include "quant_gemv.cuh"

#include <stdexcept>
#include <string>

#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"
#include "gemv_output.cuh"

namespace ffnskip::cuda {

namespace {

// The activations of a launch as int8 blocks (block_formats.cuh's QuantizedBlock), in the
// block's dynamic shared memory: q [cols], then one scale per block of Format::kElements, then
// (Format::kActivationSums16) the sums per 16.
template <typename Format>
struct SharedInput {
  int8_t* q;
  float* scale;
  int32_t* sums16;

  __device__ SharedInput(void* shared, int cols)
      : q(static_cast<int8_t*>(shared)),
        scale(reinterpret_cast<float*>(q + cols)),
        sums16(reinterpret_cast<int32_t*>(scale + cols / Format::kElements)) {}

  __device__ QuantizedBlock block(int b) const {
    return {q + b * Format::kElements, sums16 + b * (Format::kElements / 16)};
  }
};

template <typename Format>
constexpr size_t shared_input_bytes(int cols) {
  const size_t n = static_cast<size_t>(cols);
  return n + sizeof(float) * (n / Format::kElements) +
         (Format::kActivationSums16 ? sizeof(int32_t) * (n / 16) : 0);
}

// Every thread: the input row (a.x, or RMSNorm(a.norm_x) with the norm kernel's arithmetic and
// rounding to T) quantised into `in`, as the CPU backend quantises its activations. Thread t
// takes the values 8g .. 8g + 7 for g = t, t + blockDim.x, ..., so a block of kElements values
// is 4 (32-element formats) or 32 (K-quants) consecutive lanes, which share its maximum by
// shuffles.
template <typename Format, typename T>
__device__ __forceinline__ void quantize_input(const GemvArgs<T>& a, const SharedInput<Format>& in) {
  constexpr int kValues = 8;
  constexpr int kLanesPerBlock = Format::kElements / kValues;
  static_assert(kLanesPerBlock <= kWarpSize && kWarpSize % kLanesPerBlock == 0,
                "a block of activations within one warp");
  __shared__ float scratch[kWarpSize];
  const float inv_rms =
      a.norm_weight != nullptr ? row_inv_rms(a.norm_x, a.cols, a.norm_eps, scratch) : 0.0f;
  const int groups = a.cols / kValues;
  // Every warp runs every round (for the shuffles); a block of activations is all in or all
  // out of the row, since groups is a multiple of kLanesPerBlock.
  for (int first = 0; first < groups; first += blockDim.x) {
    const int g = first + threadIdx.x;
    const bool in_row = g < groups;
    float v[kValues] = {};
    if (in_row && a.norm_weight != nullptr) {
#pragma unroll
      for (int i = 0; i < kValues; ++i) {
        const int e = kValues * g + i;
        v[i] = to_float(from_float<T>(a.norm_weight[e] * (a.norm_x[e] * inv_rms)));
      }
    } else if (in_row) {
      load_run(a.x + kValues * g, v);
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kValues; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int offset = kLanesPerBlock / 2; offset > 0; offset /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
    }
    const float inverse = activation_inverse_scale(amax);
    uint32_t words[2] = {};
    int sum = 0;
#pragma unroll
    for (int i = 0; i < kValues; ++i) {
      const int q = quantize_activation(v[i], inverse);
      words[i / 4] |= (static_cast<uint32_t>(q) & 0xffu) << (8 * (i % 4));
      sum += q;
    }
    if constexpr (Format::kActivationSums16) sum += __shfl_xor_sync(kFullMask, sum, 1);
    if (!in_row) continue;
    *reinterpret_cast<uint2*>(in.q + kValues * g) = make_uint2(words[0], words[1]);
    if (g % kLanesPerBlock == 0) in.scale[g / kLanesPerBlock] = activation_scale(amax);
    if (Format::kActivationSums16 && g % 2 == 0) in.sums16[g / 2] = sum;
  }
  __syncthreads();
}

// Warp w of block b computes output b * kGemvWarpsPerBlock + w from kRows rows (2 for SwiGLU and
// RopeKv: gemv_weight_row). Lane l takes chunks l, l + 32, ... of the row (a chunk is a few
// bytes of one block, Format::kChunks per block), so each warp step reads 32 consecutive
// chunks, and adds their integer dot products with the quantised input, times its scale.
template <typename Format, typename T, GemvOutput kOutput>
__global__ void __launch_bounds__(kGemvWarpsPerBlock * kWarpSize)
    quant_gemv_kernel(const GemvArgs<T> a) {
  if (a.skip_flag != nullptr && *a.skip_flag != 0) return;
  extern __shared__ uint4 gemv_shared_input[];  // 16-byte aligned
  const SharedInput<Format> in(gemv_shared_input, a.cols);
  quantize_input(a, in);
  constexpr int kRows = kGemvRowsPerOutput<kOutput>;
  const int output = gemv_output_index();
  const int outputs = a.rows / kRows;
  if (output >= outputs) return;  // whole warps leave together
  const int64_t row_bytes = format_row_bytes<Format>(a.cols);
  const uint8_t* w[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    w[r] = static_cast<const uint8_t*>(a.weight) +
           static_cast<int64_t>(gemv_weight_row<kOutput>(a, output, r)) * row_bytes;
  }
  const int chunks = a.cols / Format::kElements * Format::kChunks;

  float acc[kRows] = {};
#pragma unroll 2
  for (int c = threadIdx.x % kWarpSize; c < chunks; c += kWarpSize) {
    const int block = c / Format::kChunks;
    const int chunk = c % Format::kChunks;
    const QuantizedBlock x = in.block(block);
    const float scale = in.scale[block];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      acc[r] = fmaf(scale, Format::dot(w[r] + block * Format::kBytes, chunk, x), acc[r]);
    }
  }
  finish_gemv_output<T, kOutput>(a, output, acc);
}

}  // namespace

template <typename T>
void launch_quant_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream) {
  visit_block_format(args.weight_type, [&](auto format) {
    using Format = decltype(format);
    if (args.cols % Format::kElements != 0) {
      throw std::invalid_argument("GEMV: rows of " + std::to_string(args.cols) +
                                  " elements are not whole blocks");
    }
    const GemvLaunch l = gemv_launch(args, output, shared_input_bytes<Format>(args.cols));
    auto launch = [&](auto kernel) {
      kernel<<<l.grid, l.block, l.shared_bytes, stream>>>(args);
    };
    switch (output) {
      case GemvOutput::Store:
        launch(quant_gemv_kernel<Format, T, GemvOutput::Store>);
        break;
      case GemvOutput::Accumulate:
        launch(quant_gemv_kernel<Format, T, GemvOutput::Accumulate>);
        break;
      case GemvOutput::SwiGLU:
        launch(quant_gemv_kernel<Format, T, GemvOutput::SwiGLU>);
        break;
      case GemvOutput::RopeKv:
        launch(quant_gemv_kernel<Format, T, GemvOutput::RopeKv>);
        break;
    }
    CUDA_CHECK_LAUNCH();
  });
}

#define FFNSKIP_INSTANTIATE(T) \
  template void launch_quant_gemv<T>(const GemvArgs<T>&, GemvOutput, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
