#include "dequantize.cuh"

#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 128;

// One thread block per output row; thread t decodes chunks t, t + kThreads, ... of the row.
template <typename Format, typename Out>
__global__ void __launch_bounds__(kThreads)
    dequantize_rows_kernel(const uint8_t* __restrict__ blocks, int cols,
                           const int32_t* __restrict__ row_ids, int64_t first_row,
                           Out* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t row = row_ids != nullptr ? row_ids[i] : first_row + i;
  const uint8_t* src = blocks + row * format_row_bytes<Format>(cols);
  Out* dst = out + i * cols;
  const int chunks = cols / Format::kElements * Format::kChunks;
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    const int block = c / Format::kChunks;
    const int chunk = c % Format::kChunks;
    float w[Format::kRuns][Format::kRunLength];
    Format::decode(src + block * Format::kBytes, chunk, w);
#pragma unroll
    for (int run = 0; run < Format::kRuns; ++run) {
      Out* run_dst = dst + block * Format::kElements + Format::run_start(chunk, run);
#pragma unroll
      for (int e = 0; e < Format::kRunLength; ++e) run_dst[e] = from_float<Out>(w[run][e]);
    }
  }
}

}  // namespace

template <typename Out>
void launch_dequantize_rows(const void* blocks, TensorType type, int cols,
                            const int32_t* row_ids, int64_t first_row, int n, Out* out,
                            cudaStream_t stream) {
  if (n <= 0) return;
  visit_block_format(type, [&](auto format) {
    using Format = decltype(format);
    dequantize_rows_kernel<Format, Out><<<n, kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(blocks), cols, row_ids, first_row, out);
    CUDA_CHECK_LAUNCH();
  });
}

#define FFNSKIP_INSTANTIATE(Out)                                                             \
  template void launch_dequantize_rows<Out>(const void*, TensorType, int, const int32_t*, \
                                            int64_t, int, Out*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
