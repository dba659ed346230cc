// The CUDA backend's factory, for the library's entry points (entry_points.cu).
#pragma once

#include "../core/backend.h"
#include "../core/model_view.h"
#include "ffnskip/config.h"
#include "ffnskip/decoder.h"

namespace ffnskip::cuda {

// A backend on the current device with the weights stored as T (float, __half,
// __nv_bfloat16), except, for `requested` DType::Auto, those in a block format the kernels read
// in place (device_model.cuh). Throws like ffnskip_cuda_create_backend (entry_points.h).
template <typename T>
Backend* new_cuda_backend(const ModelConfig& config, const ModelView& model, int max_seq_len,
                          DType requested);

}  // namespace ffnskip::cuda
