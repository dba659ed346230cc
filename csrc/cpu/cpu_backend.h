// The CPU backend: fp32, bf16 or fp16 weights, fp32 activations, a persistent thread pool, a
// KV cache of fp32 or fp16 elements (kv_cache_dtype Auto or F32, F16).
#pragma once

#include <memory>

#include "../core/backend.h"
#include "../core/model_view.h"
#include "ffnskip/config.h"
#include "ffnskip/decoder.h"

namespace ffnskip {

std::unique_ptr<Backend> make_cpu_backend(const ModelConfig& config, const ModelView& model,
                                          int max_seq_len, int num_threads, DType dtype,
                                          DType kv_cache_dtype);

}  // namespace ffnskip
