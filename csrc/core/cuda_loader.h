// The CUDA backend lives in its own shared library, loaded on first use, so that the core
// library and the Python module work on machines without a GPU, driver or cuBLAS.
//
// The library (libffnskip_cuda.so) is looked up next to the binary that contains this loader
// (the Python module, or a program or shared library linking ffnskip), then on the default
// search path (LD_LIBRARY_PATH, run paths); it is loaded once per process.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "../cuda/kernel_calls.h"
#include "backend.h"
#include "ffnskip/config.h"
#include "ffnskip/decoder.h"
#include "model_view.h"

namespace ffnskip {

// Throws std::invalid_argument saying why when no CUDA backend can be made: this build has
// none, the library (or cuBLAS) cannot be loaded, no device or driver, not enough GPU memory.
std::unique_ptr<Backend> load_cuda_backend(const ModelConfig& config, const ModelView& model,
                                           int max_seq_len, DType dtype);

// What this build and machine offer for device="cuda".
struct CudaInfo {
  bool compiled = false;        // this build has the CUDA backend
  bool available = false;       // the library loads and a CUDA device is usable
  std::string runtime_version;  // CUDA runtime of the library, "13.0"; empty if not loaded
  std::string driver_version;   // highest CUDA version the driver supports; empty if none
  std::string cublas_version;   // "13.1.2"; empty if not loaded
  std::string device_name;      // the current device; empty if none
  std::string error;            // why device="cuda" is not available; empty when it is
};

CudaInfo cuda_info();

// Device-to-device copy bandwidth, bytes read plus bytes written per second (median of
// `iterations` copies of `bytes`); throws std::invalid_argument like load_cuda_backend.
double cuda_copy_bandwidth(size_t bytes, int iterations);

// One kernel of the CUDA backend on host buffers (kernel_calls.h), for the per-kernel tests;
// throws std::invalid_argument like load_cuda_backend.
void cuda_kernel_linear(const CudaLinearCall& call);
void cuda_kernel_dequantize(const CudaDequantizeCall& call);
void cuda_kernel(const CudaKernelCall& call);

}  // namespace ffnskip
