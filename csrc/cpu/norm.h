// RMSNorm over rows of a [n, dim] matrix, in the order transformers' LlamaRMSNorm computes it.
#pragma once

#include <cstdint>

namespace ffnskip::cpu {

void rms_norm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* out);

}  // namespace ffnskip::cpu
