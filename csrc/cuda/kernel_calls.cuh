// The kernels of the CUDA backend one at a time, on device copies of host buffers
// (kernel_calls.h; the library's entry points call these).
#pragma once

#include "kernel_calls.h"

namespace ffnskip::cuda {

// Throw std::invalid_argument on inconsistent calls, std::runtime_error on CUDA errors.
void run_linear(const CudaLinearCall& call);
void run_dequantize(const CudaDequantizeCall& call);
void run_kernel(const CudaKernelCall& call);

}  // namespace ffnskip::cuda
