#include "quant_gemv.cuh"

#include <stdexcept>
#include <string>

#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"
#include "gemv_output.cuh"

namespace ffnskip::cuda {

namespace {

// A row of activations as int8 blocks (block_formats.cuh's QuantizedBlock), in a block's
// shared memory (one token) or in global memory (quantized_row_bytes apart, several tokens): q
// [cols], then one scale per block of Format::kElements, then (Format::kActivationSums16) the
// sums per 16.
template <typename Format>
struct QuantizedRow {
  int8_t* q;
  float* scale;
  int32_t* sums16;

  __device__ QuantizedRow(void* base, int cols)
      : q(static_cast<int8_t*>(base)),
        scale(reinterpret_cast<float*>(q + cols)),
        sums16(reinterpret_cast<int32_t*>(scale + cols / Format::kElements)) {}

  __device__ QuantizedBlock block(int b) const {
    return {q + b * Format::kElements, sums16 + b * (Format::kElements / 16)};
  }
};

// The bytes of a QuantizedRow of `cols` values, rounded up to 16 (rows of several tokens stay
// aligned).
template <typename Format>
__host__ __device__ constexpr size_t quantized_row_bytes(int cols) {
  const size_t n = static_cast<size_t>(cols);
  const size_t bytes = n + sizeof(float) * (n / Format::kElements) +
                       (Format::kActivationSums16 ? sizeof(int32_t) * (n / 16) : 0);
  return (bytes + 15) / 16 * 16;
}

constexpr int kQuantizeValues = 8;  // per thread and round

// Every thread of the block: the row of `cols` values whose values 8g .. 8g + 7 load(g, v)
// gives, quantised into `out` as the CPU backend quantises its activations. Thread t takes the
// groups g = t, t + blockDim.x, ..., so a block of kElements values is 4 (32-element formats) or
// 32 (K-quants) consecutive lanes, which share its maximum by shuffles. The caller synchronises
// before reading `out`.
template <typename Format, typename Load>
__device__ __forceinline__ void quantize_row(int cols, Load&& load,
                                             const QuantizedRow<Format>& out) {
  constexpr int kLanesPerBlock = Format::kElements / kQuantizeValues;
  static_assert(kLanesPerBlock <= kWarpSize && kWarpSize % kLanesPerBlock == 0,
                "a block of activations within one warp");
  const int groups = cols / kQuantizeValues;
  // Every warp runs every round (for the shuffles); a block of activations is all in or all
  // out of the row, since groups is a multiple of kLanesPerBlock.
  for (int first = 0; first < groups; first += blockDim.x) {
    const int g = first + threadIdx.x;
    const bool in_row = g < groups;
    float v[kQuantizeValues] = {};
    if (in_row) load(g, v);
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kQuantizeValues; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int offset = kLanesPerBlock / 2; offset > 0; offset /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
    }
    const float inverse = activation_inverse_scale(amax);
    uint32_t words[2] = {};
    int sum = 0;
#pragma unroll
    for (int i = 0; i < kQuantizeValues; ++i) {
      const int q = quantize_activation(v[i], inverse);
      words[i / 4] |= (static_cast<uint32_t>(q) & 0xffu) << (8 * (i % 4));
      sum += q;
    }
    if constexpr (Format::kActivationSums16) sum += __shfl_xor_sync(kFullMask, sum, 1);
    if (!in_row) continue;
    *reinterpret_cast<uint2*>(out.q + kQuantizeValues * g) = make_uint2(words[0], words[1]);
    if (g % kLanesPerBlock == 0) out.scale[g / kLanesPerBlock] = activation_scale(amax);
    if (Format::kActivationSums16 && g % 2 == 0) out.sums16[g / 2] = sum;
  }
}

// Every thread: the GEMV's input row, a.x or RMSNorm(a.norm_x) with the norm kernel's
// arithmetic and rounding to T, quantised into `in`.
template <typename Format, typename T>
__device__ __forceinline__ void quantize_gemv_input(const GemvArgs<T>& a,
                                                    const QuantizedRow<Format>& in) {
  using Values = float[kQuantizeValues];
  if (a.norm_weight != nullptr) {
    __shared__ float scratch[kWarpSize];
    const float inv_rms = row_inv_rms(a.norm_x, a.cols, a.norm_eps, scratch);
    quantize_row(a.cols, [&](int g, Values& v) {
#pragma unroll
      for (int i = 0; i < kQuantizeValues; ++i) {
        const int e = kQuantizeValues * g + i;
        v[i] = to_float(from_float<T>(a.norm_weight[e] * (a.norm_x[e] * inv_rms)));
      }
    }, in);
  } else {
    quantize_row(a.cols, [&](int g, Values& v) { load_run(a.x + kQuantizeValues * g, v); }, in);
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
  const QuantizedRow<Format> in(gemv_shared_input, a.cols);
  quantize_gemv_input(a, in);
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
      const auto weights = Format::read(w[r] + block * Format::kBytes, chunk);
      acc[r] = fmaf(scale, Format::dot(weights, chunk, x), acc[r]);
    }
  }
  finish_gemv_output<T, kOutput>(a, output, acc);
}

constexpr int kQuantizeThreads = 256;

// Block t quantises row t of x [n, cols] into the QuantizedRow at out + t * quantized_row_bytes.
template <typename Format, typename T>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_rows_kernel(const T* __restrict__ x, int cols, uint8_t* __restrict__ out) {
  const int t = blockIdx.x;
  const QuantizedRow<Format> row(out + t * quantized_row_bytes<Format>(cols), cols);
  const T* x_row = x + static_cast<int64_t>(t) * cols;
  using Values = float[kQuantizeValues];
  quantize_row(cols, [&](int g, Values& v) { load_run(x_row + kQuantizeValues * g, v); }, row);
}

// y[t, r] (+)= W[r] . x_t + b[r] for the a.n <= kBlockGemvMaxTokens quantised rows x_t at
// `quantized`: warp w of block b computes row b * kGemvWarpsPerBlock + w for every token, each
// chunk of weights read once and multiplied with each token's activations.
template <typename Format, typename T>
__global__ void __launch_bounds__(kGemvWarpsPerBlock * kWarpSize)
    quant_gemv_tokens_kernel(const GemmArgs<T> a, uint8_t* quantized) {
  const int row = gemv_output_index();
  if (row >= a.rows) return;  // whole warps leave together
  const uint8_t* w = static_cast<const uint8_t*>(a.weight) +
                     static_cast<int64_t>(row) * format_row_bytes<Format>(a.cols);
  const size_t stride = quantized_row_bytes<Format>(a.cols);
  const int chunks = a.cols / Format::kElements * Format::kChunks;
  float acc[kBlockGemvMaxTokens] = {};
  for (int c = threadIdx.x % kWarpSize; c < chunks; c += kWarpSize) {
    const int block = c / Format::kChunks;
    const int chunk = c % Format::kChunks;
    const auto weights = Format::read(w + block * Format::kBytes, chunk);
#pragma unroll
    for (int t = 0; t < kBlockGemvMaxTokens; ++t) {
      if (t >= a.n) break;
      const QuantizedRow<Format> x(quantized + t * stride, a.cols);
      acc[t] = fmaf(x.scale[block], Format::dot(weights, chunk, x.block(block)), acc[t]);
    }
  }
  const float bias = a.bias != nullptr ? a.bias[row] : 0.0f;
#pragma unroll
  for (int t = 0; t < kBlockGemvMaxTokens; ++t) {
    if (t >= a.n) break;
    const float sum = warp_sum(acc[t]) + bias;
    if (threadIdx.x % kWarpSize == 0) {
      float& y = a.y[static_cast<int64_t>(t) * a.y_stride + row];
      y = a.accumulate ? y + sum : sum;
    }
  }
}

}  // namespace

size_t quant_gemv_tokens_scratch_bytes(TensorType type, int cols) {
  size_t bytes = 0;
  visit_block_format(type, [&](auto format) {
    bytes = kBlockGemvMaxTokens * quantized_row_bytes<decltype(format)>(cols);
  });
  return bytes;
}

template <typename T>
void launch_quant_gemv_tokens(const GemmArgs<T>& a, cudaStream_t stream) {
  visit_block_format(a.weight_type, [&](auto format) {
    using Format = decltype(format);
    if (a.cols % Format::kElements != 0) {
      throw std::invalid_argument("GEMM: rows of " + std::to_string(a.cols) +
                                  " elements are not whole blocks");
    }
    if (a.n < 1 || a.n > kBlockGemvMaxTokens) {
      throw std::invalid_argument("GEMM: the block GEMV takes 1 to " +
                                  std::to_string(kBlockGemvMaxTokens) + " tokens, not " +
                                  std::to_string(a.n));
    }
    const size_t needed = a.n * quantized_row_bytes<Format>(a.cols);
    if (a.scratch == nullptr || sizeof(T) * static_cast<size_t>(a.scratch_elements) < needed) {
      throw std::invalid_argument("GEMM over blocks: no scratch for the int8 activations");
    }
    auto* quantized = reinterpret_cast<uint8_t*>(a.scratch);
    quantize_rows_kernel<Format, T><<<a.n, kQuantizeThreads, 0, stream>>>(a.x, a.cols, quantized);
    CUDA_CHECK_LAUNCH();
    quant_gemv_tokens_kernel<Format, T>
        <<<ceil_div(a.rows, kGemvWarpsPerBlock), kGemvWarpsPerBlock * kWarpSize, 0, stream>>>(
            a, quantized);
    CUDA_CHECK_LAUNCH();
  });
}

template <typename T>
void launch_quant_gemv(const GemvArgs<T>& args, GemvOutput output, cudaStream_t stream) {
  visit_block_format(args.weight_type, [&](auto format) {
    using Format = decltype(format);
    if (args.cols % Format::kElements != 0) {
      throw std::invalid_argument("GEMV: rows of " + std::to_string(args.cols) +
                                  " elements are not whole blocks");
    }
    const GemvLaunch l = gemv_launch(args, output, quantized_row_bytes<Format>(args.cols));
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

#define FFNSKIP_INSTANTIATE(T)                                                         \
  template void launch_quant_gemv<T>(const GemvArgs<T>&, GemvOutput, cudaStream_t); \
  template void launch_quant_gemv_tokens<T>(const GemmArgs<T>&, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
