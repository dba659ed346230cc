// Decode linears (one token) on the GPU: the engine's GEMV kernel against cuBLAS (cublasGemmEx
// with n = 1, fp32 compute), per shape of the LLaMA-2-7B and LLaMA-3-8B presets, fp16 and bf16.
// Prints the time per call, the weight bandwidth, the agreement of the two results, and which
// one is faster: the table from which the backend's per-shape choice is made.
//   bench_gemv [--iterations N]
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.cuh"
#include "cuda_check.cuh"
#include "gemm.cuh"
#include "gemv.cuh"
#include "swiglu.cuh"

using namespace ffnskip::cuda;

namespace {

struct Shape {
  const char* model;
  const char* name;
  int rows;
  int cols;
  bool swiglu;  // stacked gate/up rows, SwiGLU epilogue
};

const Shape kShapes[] = {
    {"llama2-7b", "qkv", 3 * 4096, 4096, false},
    {"llama2-7b", "o", 4096, 4096, false},
    {"llama2-7b", "gate_up", 2 * 11008, 4096, true},
    {"llama2-7b", "down", 4096, 11008, false},
    {"llama2-7b", "lm_head", 32000, 4096, false},
    {"llama3-8b", "qkv", 4096 + 2 * 1024, 4096, false},
    {"llama3-8b", "o", 4096, 4096, false},
    {"llama3-8b", "gate_up", 2 * 14336, 4096, true},
    {"llama3-8b", "down", 4096, 14336, false},
    {"llama3-8b", "lm_head", 128256, 4096, false},
};

template <typename T>
struct DeviceArray {
  T* data = nullptr;
  explicit DeviceArray(size_t count) { CUDA_CHECK(cudaMalloc(&data, sizeof(T) * count)); }
  ~DeviceArray() { cudaFree(data); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

template <typename T>
void fill_random(T* device, size_t count, unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<T> host(count);
  for (auto& v : host) v = from_float<T>(dist(rng));
  CUDA_CHECK(cudaMemcpy(device, host.data(), sizeof(T) * count, cudaMemcpyHostToDevice));
}

// Median time per call in microseconds of `run(copy)` over `iterations` calls, cycling through
// the weight copies so that the weights come from device memory, not from L2.
template <typename Run>
double time_us(cudaStream_t stream, int copies, int iterations, Run run) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < copies; ++i) run(i);  // warm-up
  std::vector<double> samples;
  for (int repeat = 0; repeat < 5; ++repeat) {
    CUDA_CHECK(cudaEventRecord(start, stream));
    for (int i = 0; i < iterations; ++i) run(i % copies);
    CUDA_CHECK(cudaEventRecord(stop, stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(1e3 * ms / iterations);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

template <typename T>
void bench_shape(const Shape& s, const char* dtype, cublasHandle_t handle, cudaStream_t stream,
                 size_t l2_bytes, int iterations) {
  const size_t weight_count = static_cast<size_t>(s.rows) * s.cols;
  const size_t weight_bytes = sizeof(T) * weight_count;
  const int copies = static_cast<int>(std::max<size_t>(1, (4 * l2_bytes) / weight_bytes + 1));
  DeviceArray<T> weights(weight_count * copies);
  DeviceArray<T> x(s.cols);
  DeviceArray<float> y_custom(s.rows), y_cublas(s.rows), gate_up(s.rows);
  DeviceArray<T> act_custom(s.rows / 2), act_cublas(s.rows / 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.cols));
  fill_random(weights.data, weight_count * copies, 1, scale);
  fill_random(x.data, s.cols, 2, 1.0f);

  auto custom = [&](int copy) {
    GemvArgs<T> g;
    g.weight = weights.data + weight_count * copy;
    g.rows = s.rows;
    g.cols = s.cols;
    g.x = x.data;
    g.y = y_custom.data;
    g.act = act_custom.data;
    launch_gemv(g, s.swiglu ? GemvOutput::SwiGLU : GemvOutput::Store, stream);
  };
  auto cublas = [&](int copy) {
    GemmArgs<T> g;
    g.weight = weights.data + weight_count * copy;
    g.rows = s.rows;
    g.cols = s.cols;
    g.x = x.data;
    g.n = 1;
    g.y = s.swiglu ? gate_up.data : y_cublas.data;
    g.y_stride = s.rows;
    gemm(handle, stream, g);
    if (s.swiglu) launch_swiglu(gate_up.data, 1, s.rows / 2, act_cublas.data, nullptr, stream);
  };
  const double custom_us = time_us(stream, copies, iterations, custom);
  const double cublas_us = time_us(stream, copies, iterations, cublas);

  // Agreement of the two on copy 0: max |difference| over max |value|.
  custom(0);
  cublas(0);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> a, b;
  if (s.swiglu) {
    std::vector<T> ta(s.rows / 2), tb(s.rows / 2);
    const size_t bytes = sizeof(T) * ta.size();
    CUDA_CHECK(cudaMemcpy(ta.data(), act_custom.data, bytes, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(tb.data(), act_cublas.data, bytes, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < ta.size(); ++i) {
      a.push_back(static_cast<float>(ta[i]));
      b.push_back(static_cast<float>(tb[i]));
    }
  } else {
    a.resize(s.rows);
    b.resize(s.rows);
    const size_t bytes = sizeof(float) * s.rows;
    CUDA_CHECK(cudaMemcpy(a.data(), y_custom.data, bytes, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(b.data(), y_cublas.data, bytes, cudaMemcpyDeviceToHost));
  }
  double max_diff = 0.0, max_value = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(a[i] - b[i])));
    max_value = std::max(max_value, static_cast<double>(std::fabs(b[i])));
  }
  const double gb = static_cast<double>(weight_bytes) / 1e9;
  std::printf("%-10s %-8s %-5s %6d x %-6d %9.2f %8.0f %9.2f %8.0f %10.2e  %s\n", s.model, s.name,
              dtype, s.rows, s.cols, custom_us, gb / (custom_us * 1e-6), cublas_us,
              gb / (cublas_us * 1e-6), max_diff / std::max(max_value, 1e-30),
              custom_us <= cublas_us ? "custom" : "cublas");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    int iterations = 200;
    for (int i = 1; i < argc; ++i) {
      if (std::strcmp(argv[i], "--iterations") == 0 && i + 1 < argc) {
        iterations = std::max(1, std::atoi(argv[++i]));
      } else {
        std::fprintf(stderr, "usage: bench_gemv [--iterations N]\n");
        return 2;
      }
    }
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cublasHandle_t handle;
    CUBLAS_CHECK(cublasCreate(&handle));
    CUBLAS_CHECK(cublasSetStream(handle, stream));
    std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
                prop.l2CacheSize >> 20);
    std::printf("%-10s %-8s %-5s %15s %9s %8s %9s %8s %10s  %s\n", "model", "linear", "dtype",
                "rows x cols", "custom_us", "GB/s", "cublas_us", "GB/s", "rel_diff", "faster");
    for (const Shape& s : kShapes) {
      bench_shape<__half>(s, "fp16", handle, stream, prop.l2CacheSize, iterations);
      bench_shape<__nv_bfloat16>(s, "bf16", handle, stream, prop.l2CacheSize, iterations);
    }
    CUBLAS_CHECK(cublasDestroy(handle));
    CUDA_CHECK(cudaStreamDestroy(stream));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gemv: %s\n", e.what());
    return 1;
  }
}
