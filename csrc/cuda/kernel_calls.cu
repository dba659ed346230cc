#include "kernel_calls.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/tensor_types.h"
#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"
#include "device.cuh"
#include "dequantize.cuh"
#include "embedding.cuh"
#include "gemm.cuh"
#include "gemv.cuh"
#include "swiglu.cuh"

namespace ffnskip::cuda {

namespace {

// `bytes` of device memory (256-byte aligned, as the arena's pieces), filled from `host` when
// given, on `stream`: the kernels' stream does not wait for the legacy default stream that
// cudaMemcpy would use (the pageable source is staged before the call returns).
DeviceMemory device_buffer(cudaStream_t stream, size_t bytes, const void* host = nullptr) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  DeviceMemory memory(static_cast<char*>(p));
  if (host != nullptr && bytes > 0) {
    CUDA_CHECK(cudaMemcpyAsync(p, host, bytes, cudaMemcpyHostToDevice, stream));
  }
  return memory;
}

template <typename T>
std::vector<T> rounded(const float* values, int64_t count) {
  std::vector<T> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out[i] = from_float<T>(values[i]);
  return out;
}

template <typename T>
void widen(const std::vector<T>& values, float* out) {
  for (size_t i = 0; i < values.size(); ++i) out[i] = static_cast<float>(values[i]);
}

// Calls run(T{}) with T the storage type of `dtype`.
template <typename Run>
void with_storage_type(DType dtype, Run&& run) {
  switch (dtype) {
    case DType::F32: return run(float{});
    case DType::F16: return run(__half{});
    case DType::BF16: return run(__nv_bfloat16{});
    case DType::Auto: break;
  }
  throw std::invalid_argument("the kernels run in float32, float16 or bfloat16");
}

void check_block_format(TensorType type, int cols) {
  if (!is_native_block_format(type)) {
    throw std::invalid_argument(std::string("tensor type ") + tensor_type_name(type) +
                                " is not read in place by the CUDA kernels");
  }
  row_bytes(type, cols, "a row");  // throws unless whole blocks
}

template <typename T>
void linear_in(const CudaLinearCall& c) {
  const bool blocks = c.weight_type != TensorType::F32;
  if (blocks) check_block_format(c.weight_type, c.cols);
  const bool swiglu = c.output == CudaLinearOutput::SwiGLU;
  if (c.rows <= 0 || c.cols <= 0 || c.n <= 0 || (swiglu && c.rows % 2 != 0)) {
    throw std::invalid_argument("linear: bad shape");
  }
  if (c.gemv && c.n != 1) throw std::invalid_argument("the GEMV runs one token");
  if (!c.gemv && c.skip) throw std::invalid_argument("only the GEMV reads a skip flag");
  const int64_t weights = static_cast<int64_t>(c.rows) * c.cols;
  const int outputs = swiglu ? c.rows / 2 : c.rows;
  const int64_t out_count = static_cast<int64_t>(c.n) * outputs;

  const Stream owned_stream = make_stream();  // first: destroyed after the buffers
  cudaStream_t stream = owned_stream.get();
  DeviceMemory weight =
      blocks ? device_buffer(stream, c.rows * row_bytes(c.weight_type, c.cols), c.weight)
             : device_buffer(stream, sizeof(T) * weights,
                             rounded<T>(static_cast<const float*>(c.weight), weights).data());
  const int64_t x_count = static_cast<int64_t>(c.n) * c.cols;
  DeviceMemory x = device_buffer(stream, sizeof(T) * x_count, rounded<T>(c.x, x_count).data());
  DeviceMemory bias = device_buffer(stream, sizeof(float) * c.rows, c.bias);
  DeviceMemory y =
      swiglu ? device_buffer(stream, sizeof(T) * out_count, rounded<T>(c.y, out_count).data())
             : device_buffer(stream, sizeof(float) * out_count, c.y);
  const int32_t flag = c.skip ? 1 : 0;
  DeviceMemory skip_flag = device_buffer(stream, sizeof(flag), &flag);
  const TensorType weight_type = blocks ? c.weight_type : dense_tensor_type<T>();
  const float* bias_data = c.bias != nullptr ? reinterpret_cast<float*>(bias.get()) : nullptr;

  if (c.gemv) {
    GemvArgs<T> g;
    g.weight = weight.get();
    g.weight_type = weight_type;
    g.bias = bias_data;
    g.rows = c.rows;
    g.cols = c.cols;
    g.x = reinterpret_cast<T*>(x.get());
    g.y = reinterpret_cast<float*>(y.get());
    g.act = reinterpret_cast<T*>(y.get());
    g.skip_flag = reinterpret_cast<int32_t*>(skip_flag.get());
    const GemvOutput output = swiglu                                    ? GemvOutput::SwiGLU
                              : c.output == CudaLinearOutput::Accumulate ? GemvOutput::Accumulate
                                                                         : GemvOutput::Store;
    launch_gemv(g, output, stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
  } else {
    cublasHandle_t handle = nullptr;
    CUBLAS_CHECK(cublasCreate(&handle));
    CublasHandle cublas(handle);
    CUBLAS_CHECK(cublasSetStream(handle, stream));
    const int64_t tile = c.tile_elements > 0 ? c.tile_elements : weights;
    DeviceMemory scratch = device_buffer(stream, blocks ? sizeof(T) * tile : 0);
    DeviceMemory gate_up = device_buffer(stream, swiglu ? sizeof(float) * c.n * c.rows : 0);
    GemmArgs<T> g;
    g.weight = weight.get();
    g.weight_type = weight_type;
    g.bias = bias_data;
    g.rows = c.rows;
    g.cols = c.cols;
    g.x = reinterpret_cast<T*>(x.get());
    g.n = c.n;
    g.y = reinterpret_cast<float*>(swiglu ? gate_up.get() : y.get());
    g.y_stride = c.rows;
    g.accumulate = c.output == CudaLinearOutput::Accumulate;
    g.scratch = reinterpret_cast<T*>(scratch.get());
    g.scratch_elements = blocks ? tile : 0;
    gemm(handle, stream, g);
    if (swiglu) {
      launch_swiglu(reinterpret_cast<float*>(gate_up.get()), c.n, outputs,
                    reinterpret_cast<T*>(y.get()), nullptr, stream);
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));  // before the handle and scratch go
  }
  if (swiglu) {
    std::vector<T> act(static_cast<size_t>(out_count));
    CUDA_CHECK(cudaMemcpy(act.data(), y.get(), sizeof(T) * act.size(), cudaMemcpyDeviceToHost));
    widen(act, c.y);
  } else {
    CUDA_CHECK(cudaMemcpy(c.y, y.get(), sizeof(float) * out_count, cudaMemcpyDeviceToHost));
  }
}

template <typename T>
void dequantize_in(const CudaDequantizeCall& c) {
  check_block_format(c.type, c.cols);
  if (c.rows <= 0 || (c.ids != nullptr && c.n <= 0)) {
    throw std::invalid_argument("dequantize: bad shape");
  }
  for (int i = 0; c.ids != nullptr && i < c.n; ++i) {
    if (c.ids[i] < 0 || c.ids[i] >= c.rows) throw std::invalid_argument("row id out of range");
  }
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  DeviceMemory data = device_buffer(stream, c.rows * row_bytes(c.type, c.cols), c.data);
  if (c.ids != nullptr) {
    const int64_t count = static_cast<int64_t>(c.n) * c.cols;
    DeviceMemory ids = device_buffer(stream, sizeof(int32_t) * c.n, c.ids);
    DeviceMemory out = device_buffer(stream, sizeof(float) * count);
    launch_embedding<T>(data.get(), c.type, reinterpret_cast<int32_t*>(ids.get()), c.n, c.cols,
                        reinterpret_cast<float*>(out.get()), stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    CUDA_CHECK(cudaMemcpy(c.out, out.get(), sizeof(float) * count, cudaMemcpyDeviceToHost));
    return;
  }
  const int64_t count = static_cast<int64_t>(c.rows) * c.cols;
  DeviceMemory out = device_buffer(stream, sizeof(T) * count);
  launch_dequantize_rows(data.get(), c.type, c.cols, nullptr, 0, c.rows,
                         reinterpret_cast<T*>(out.get()), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<T> values(static_cast<size_t>(count));
  CUDA_CHECK(cudaMemcpy(values.data(), out.get(), sizeof(T) * count, cudaMemcpyDeviceToHost));
  widen(values, c.out);
}

}  // namespace

void run_linear(const CudaLinearCall& call) {
  with_storage_type(call.activation, [&](auto t) { linear_in<decltype(t)>(call); });
}

void run_dequantize(const CudaDequantizeCall& call) {
  with_storage_type(call.out_type, [&](auto t) { dequantize_in<decltype(t)>(call); });
}

}  // namespace ffnskip::cuda
