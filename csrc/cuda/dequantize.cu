#include "dequantize.cuh"

#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr int kThreads = 128;

// One thread block per output row.
template <typename Format, typename Out>
__global__ void __launch_bounds__(kThreads)
    dequantize_rows_kernel(const uint8_t* __restrict__ blocks, int cols, int64_t first_row,
                           Out* __restrict__ out) {
  const int64_t i = blockIdx.x;
  dequantize_row<Format>(blocks + (first_row + i) * format_row_bytes<Format>(cols), cols,
                         out + i * cols, threadIdx.x, kThreads);
}

}  // namespace

template <typename Out>
void launch_dequantize_rows(const void* blocks, TensorType type, int cols, int64_t first_row,
                            int n, Out* out, cudaStream_t stream) {
  if (n <= 0) return;
  visit_block_format(type, [&](auto format) {
    using Format = decltype(format);
    dequantize_rows_kernel<Format, Out><<<n, kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(blocks), cols, first_row, out);
    CUDA_CHECK_LAUNCH();
  });
}

#define FFNSKIP_INSTANTIATE(Out)                                                         \
  template void launch_dequantize_rows<Out>(const void*, TensorType, int, int64_t, int, \
                                            Out*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
