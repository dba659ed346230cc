// SwiGLU: act = silu(gate) * up, from the outputs of the stacked [gate; up] projection (the
// CPU backend's layout). The decode GEMV applies silu_mul in its epilogue; prefill runs the
// kernel, and so do decode steps whose gate and up weights differ in format.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffnskip::cuda {

// The CPU backend's formula: gate / (1 + exp(-gate)) * up.
__device__ __forceinline__ float silu_mul(float gate, float up) {
  return gate / (1.0f + expf(-gate)) * up;
}

// act[t, i] = silu_mul(gate_up[t, i], gate_up[t, inter + i]) for t < n, i < inter; nothing when
// skip_flag is non-null and *skip_flag != 0 (a skipped FFN, see GemvArgs::skip_flag).
template <typename T>
void launch_swiglu(const float* gate_up, int n, int inter, T* act, const int32_t* skip_flag,
                   cudaStream_t stream);

}  // namespace ffnskip::cuda
