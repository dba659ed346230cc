#include "quant_gemv.cuh"

#include <stdexcept>
#include <string>

#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"
#include "gemv_output.cuh"

namespace ffnskip::cuda {

namespace {

// Warp w of block b computes output b * kGemvWarpsPerBlock + w from kRows rows (2 for SwiGLU and
// RopeKv: gemv_weight_row). Lane l decodes chunks l, l + 32, ... of the row (a chunk is a
// few bytes of one block, Format::kChunks per block), so each warp step reads 32 consecutive
// chunks, and multiplies them with the matching runs of x.
template <typename Format, typename T, GemvOutput kOutput>
__global__ void __launch_bounds__(kGemvWarpsPerBlock * kWarpSize)
    quant_gemv_kernel(const GemvArgs<T> a) {
  if (a.skip_flag != nullptr && *a.skip_flag != 0) return;
  const T* __restrict__ input = gemv_input(a);
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
    const T* x = input + block * Format::kElements;
    float xv[Format::kRuns][Format::kRunLength];
#pragma unroll
    for (int run = 0; run < Format::kRuns; ++run) {
      load_run(x + Format::run_start(chunk, run), xv[run]);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float wv[Format::kRuns][Format::kRunLength];
      Format::decode(w[r] + block * Format::kBytes, chunk, wv);
#pragma unroll
      for (int run = 0; run < Format::kRuns; ++run) {
#pragma unroll
        for (int i = 0; i < Format::kRunLength; ++i) {
          acc[r] = fmaf(wv[run][i], xv[run][i], acc[r]);
        }
      }
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
    const GemvLaunch l = gemv_launch(args, output);
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
