// Single CUDA kernels run on host buffers, for the per-kernel tests (tests/test_cuda_kernels.py):
// the requests the core's loader hands to libffnskip_cuda.so (entry_points.h). Plain C++, so the
// core and the Python module compile them without the CUDA toolkit.
#pragma once

#include <cstdint>

#include "ffnskip/decoder.h"
#include "ffnskip/weights.h"

namespace ffnskip {

enum class CudaLinearOutput : uint8_t { Store, Accumulate, SwiGLU };  // GemvOutput's modes

// y = x W^T + b over n tokens, as the backend runs a linear: the decode GEMV (gemv, n == 1) or
// the prefill path (cuBLAS, over tiles dequantised to T for a block format).
struct CudaLinearCall {
  // [rows, cols]: the blocks of a native block format (Q8_0, Q5_0, Q4_K, Q6_K), or F32 values
  // that the call rounds to the activation type (the dense kernels).
  const void* weight = nullptr;
  TensorType weight_type = TensorType::F32;
  int rows = 0;
  int cols = 0;
  const float* bias = nullptr;  // [rows] or null
  const float* x = nullptr;     // [n, cols], rounded to the activation type
  int n = 1;
  DType activation = DType::F16;  // F32, F16 or BF16: the backend's storage type T
  CudaLinearOutput output = CudaLinearOutput::Store;
  bool gemv = true;
  bool skip = false;  // GEMV: its skip flag is set, so it must write nothing
  // Prefill of a block format: the dequantisation scratch in elements (several tiles when
  // smaller than rows * cols); 0: rows * cols.
  int64_t tile_elements = 0;
  // In: the output before the call; out: after it. Store, Accumulate: [n, rows]; SwiGLU:
  // [n, rows / 2], rounded to the activation type on the way in, widened on the way out.
  float* y = nullptr;
};

// Rows of a native block format dequantised on the device.
struct CudaDequantizeCall {
  const void* data = nullptr;  // [rows, cols] in `type`
  TensorType type = TensorType::Q8_0;
  int rows = 0;
  int cols = 0;
  // Non-null: the embedding lookup of these n rows into fp32; null: every row into `out_type`
  // (F32, F16 or BF16), as the prefill's weight tiles.
  const int32_t* ids = nullptr;
  int n = 0;
  DType out_type = DType::F32;
  float* out = nullptr;  // [n or rows, cols], widened to fp32
};

}  // namespace ffnskip
