#include "cuda_loader.h"

#include <stdexcept>
#include <string>

#ifdef FFNSKIP_WITH_CUDA
#include <dlfcn.h>
#include <unistd.h>

#include <climits>

#include "../cuda/entry_points.h"
#endif

namespace ffnskip {

namespace {

constexpr const char* kUnavailable = "device='cuda' is not available: ";

#ifndef FFNSKIP_WITH_CUDA

constexpr const char* kNotCompiled =
    "this build of ffnskip has no CUDA backend (rebuild with FFNSKIP_CUDA=ON on a machine with "
    "nvcc and cuBLAS)";

#else

struct CudaLibrary {
  void* handle = nullptr;
  std::string error;  // why it could not be loaded
};

// Directory (with a trailing '/') of the binary that contains this code.
std::string directory_of_this_binary() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&load_cuda_backend), &info) == 0 ||
      info.dli_fname == nullptr) {
    return {};
  }
  std::string path = info.dli_fname;
  if (path.find('/') == std::string::npos) {  // the main program, started through PATH
    char exe[PATH_MAX];
    const ssize_t length = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (length <= 0) return {};
    path.assign(exe, static_cast<size_t>(length));
  }
  return path.substr(0, path.rfind('/') + 1);
}

CudaLibrary open_cuda_library() {
  CudaLibrary library;
  const std::string beside = directory_of_this_binary() + FFNSKIP_CUDA_LIBRARY_NAME;
  const bool exists_beside = access(beside.c_str(), F_OK) == 0;
  library.handle = dlopen(exists_beside ? beside.c_str() : FFNSKIP_CUDA_LIBRARY_NAME,
                          RTLD_NOW | RTLD_LOCAL);
  if (library.handle == nullptr) {
    const char* error = dlerror();  // names the missing dependency, e.g. libcublas.so.13
    library.error = std::string("the CUDA backend library could not be loaded: ") +
                    (error != nullptr ? error : FFNSKIP_CUDA_LIBRARY_NAME);
    return library;
  }
  using Interface = decltype(&ffnskip_cuda_interface);
  const auto interface =
      reinterpret_cast<Interface>(dlsym(library.handle, "ffnskip_cuda_interface"));
  const std::string found = interface != nullptr ? interface() : "none";
  if (found != FFNSKIP_CUDA_INTERFACE) {
    dlclose(library.handle);
    library.handle = nullptr;
    library.error = std::string("the CUDA backend library found (") +
                    (exists_beside ? beside : FFNSKIP_CUDA_LIBRARY_NAME) +
                    ") belongs to another build (interface " + found + ", expected " +
                    FFNSKIP_CUDA_INTERFACE + ")";
  }
  return library;
}

// Loaded once; the library stays loaded for the life of the process (backends run its code).
const CudaLibrary& cuda_library() {
  static const CudaLibrary library = open_cuda_library();
  return library;
}

template <typename Function>
Function cuda_entry(const char* name) {
  const CudaLibrary& library = cuda_library();
  if (library.handle == nullptr) throw std::invalid_argument(kUnavailable + library.error);
  void* symbol = dlsym(library.handle, name);
  if (symbol == nullptr) {
    throw std::invalid_argument(std::string(kUnavailable) + "the CUDA backend library lacks " +
                                name);
  }
  return reinterpret_cast<Function>(symbol);
}

// An entry point of the loaded library, by the name of its declaration in entry_points.h.
#define FFNSKIP_CUDA_ENTRY(name) cuda_entry<decltype(&name)>(#name)

std::string version_text(int version, int major_unit, int minor_unit) {
  return std::to_string(version / major_unit) + "." +
         std::to_string(version % major_unit / minor_unit);
}

#endif

}  // namespace

#ifndef FFNSKIP_WITH_CUDA

std::unique_ptr<Backend> load_cuda_backend(const ModelConfig&, const ModelView&, int, DType) {
  throw std::invalid_argument(std::string(kUnavailable) + kNotCompiled);
}

CudaInfo cuda_info() {
  CudaInfo info;
  info.error = std::string(kUnavailable) + kNotCompiled;
  return info;
}

double cuda_copy_bandwidth(size_t, int) {
  throw std::invalid_argument(std::string(kUnavailable) + kNotCompiled);
}

void cuda_kernel_linear(const CudaLinearCall&) {
  throw std::invalid_argument(std::string(kUnavailable) + kNotCompiled);
}

void cuda_kernel_dequantize(const CudaDequantizeCall&) {
  throw std::invalid_argument(std::string(kUnavailable) + kNotCompiled);
}

void cuda_kernel(const CudaKernelCall&) {
  throw std::invalid_argument(std::string(kUnavailable) + kNotCompiled);
}

#else

std::unique_ptr<Backend> load_cuda_backend(const ModelConfig& config, const ModelView& model,
                                           int max_seq_len, DType dtype) {
  const auto create = FFNSKIP_CUDA_ENTRY(ffnskip_cuda_create_backend);
  return std::unique_ptr<Backend>(create(&config, &model, max_seq_len, dtype));
}

CudaInfo cuda_info() {
  CudaInfo info;
  info.compiled = true;
  if (cuda_library().handle == nullptr) {
    info.error = kUnavailable + cuda_library().error;
    return info;
  }
  CudaRuntimeQuery query;
  FFNSKIP_CUDA_ENTRY(ffnskip_cuda_query)(&query);
  info.runtime_version = version_text(query.runtime_version, 1000, 10);
  if (query.driver_version > 0) info.driver_version = version_text(query.driver_version, 1000, 10);
  if (query.cublas_version > 0) {
    info.cublas_version = version_text(query.cublas_version, 10000, 100) + "." +
                          std::to_string(query.cublas_version % 100);
  }
  info.available = query.device_count > 0;
  info.device_name = query.device_name;
  info.error = query.error;
  return info;
}

double cuda_copy_bandwidth(size_t bytes, int iterations) {
  return FFNSKIP_CUDA_ENTRY(ffnskip_cuda_copy_bandwidth)(bytes, iterations);
}

void cuda_kernel_linear(const CudaLinearCall& call) {
  FFNSKIP_CUDA_ENTRY(ffnskip_cuda_kernel_linear)(&call);
}

void cuda_kernel_dequantize(const CudaDequantizeCall& call) {
  FFNSKIP_CUDA_ENTRY(ffnskip_cuda_kernel_dequantize)(&call);
}

void cuda_kernel(const CudaKernelCall& call) { FFNSKIP_CUDA_ENTRY(ffnskip_cuda_kernel)(&call); }

#endif

}  // namespace ffnskip
