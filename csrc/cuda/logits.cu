#include "logits.cuh"

#include "common.cuh"
#include "gemv.cuh"
#include "norm.cuh"

namespace ffnskip::cuda {

template <typename T>
void launch_logits_head(const float* x_row, int hidden, const float* final_norm, float eps,
                        const void* lm_head, TensorType lm_head_type, int vocab, T* normed,
                        float* logits, cudaStream_t stream) {
  GemvArgs<T> head;
  head.weight = lm_head;
  head.weight_type = lm_head_type;
  head.rows = vocab;
  head.cols = hidden;
  head.y = logits;
  if (gemv_folds_norm<T>(hidden)) {  // the norm in the GEMV's prologue: one launch fewer
    head.norm_weight = final_norm;
    head.norm_x = x_row;
    head.norm_eps = eps;
  } else {
    launch_rmsnorm(x_row, 1, hidden, final_norm, eps, normed, stream);
    head.x = normed;
  }
  launch_gemv(head, GemvOutput::Store, stream);
}

#define FFNSKIP_INSTANTIATE(T)                                                                 \
  template void launch_logits_head<T>(const float*, int, const float*, float, const void*,   \
                                      TensorType, int, T*, float*, cudaStream_t);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
