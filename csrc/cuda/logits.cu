#include "logits.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemv.cuh"
#include "norm.cuh"

namespace ffnskip::cuda {

template <typename T>
void launch_logits_head(const float* x_row, int hidden, const float* final_norm, float eps,
                        const T* lm_head, int vocab, T* normed, float* logits,
                        cudaStream_t stream) {
  launch_rmsnorm(x_row, 1, hidden, final_norm, eps, normed, stream);
  GemvArgs<T> head;
  head.weight = lm_head;
  head.rows = vocab;
  head.cols = hidden;
  head.x = normed;
  head.y = logits;
  launch_gemv(head, GemvOutput::Store, stream);
}

template void launch_logits_head<float>(const float*, int, const float*, float, const float*,
                                        int, float*, float*, cudaStream_t);
template void launch_logits_head<__half>(const float*, int, const float*, float, const __half*,
                                         int, __half*, float*, cudaStream_t);
template void launch_logits_head<__nv_bfloat16>(const float*, int, const float*, float,
                                                const __nv_bfloat16*, int, __nv_bfloat16*,
                                                float*, cudaStream_t);

}  // namespace ffnskip::cuda
