#include "storage.h"

namespace ffnskip::cpu {

std::vector<uint16_t> to_half(const float* data, int64_t count, WeightType type) {
  std::vector<uint16_t> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    out[i] = type == WeightType::BF16 ? float_to_bf16(data[i]) : float_to_f16(data[i]);
  }
  return out;
}

}  // namespace ffnskip::cpu
