// The CUDA backend lives in its own shared library, loaded on first use, so that the core
// library and the Python module work on machines without a GPU, driver or cuBLAS.
#pragma once

#include <memory>

#include "ffnskip/backend.h"
#include "ffnskip/config.h"
#include "ffnskip/decoder.h"
#include "ffnskip/weights.h"

namespace ffnskip {

// Throws std::invalid_argument saying why when no CUDA backend can be made.
std::unique_ptr<Backend> load_cuda_backend(const ModelConfig& config, const ModelView& model,
                                           int max_seq_len, DType dtype);

}  // namespace ffnskip
