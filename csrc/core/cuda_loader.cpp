#include "cuda_loader.h"

#include <stdexcept>

namespace ffnskip {

std::unique_ptr<Backend> load_cuda_backend(const ModelConfig&, const ModelView&, int, DType) {
  throw std::invalid_argument(
      "device='cuda' is not available: this build of ffnskip has no CUDA backend "
      "(rebuild with FFNSKIP_CUDA=ON on a machine with nvcc and cuBLAS)");
}

}  // namespace ffnskip
