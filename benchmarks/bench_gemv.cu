// Decode linears (one token) on the GPU, per shape of the LLaMA-2-7B and LLaMA-3-8B presets.
// First table: the engine's GEMV kernel against cuBLAS (cublasGemmEx with n = 1, fp32 compute),
// fp16 and bf16 weights: the time per call, the weight bandwidth, the agreement of the two
// results, and which one is faster (the table from which the backend's per-shape choice is
// made). Second table: the GEMV over GGUF blocks read in place (Q8_0, Q5_0, Q4_K, Q6_K; random
// blocks, fp16 activations): the time per call, the bandwidth of the blocks' bytes, the speedup
// over the fp16 GEMV against the ideal from bytes not read, and the agreement with cuBLAS on the
// blocks dequantised to fp16 (the prefill path; the block GEMV quantises its input to int8, so
// they differ by about 1e-2, that quantisation's error). For the linears whose input is an
// RMSNorm (qkv, gate_up, lm_head), the first table also times the decode step's fused form, the
// norm in the GEMV's prologue (fold_us), against the norm kernel then the GEMV (norm_gemv_us),
// back to back on the stream: whether the fold pays for the launch it saves. Third table
// (LLaMA-3-8B, Q8_0 and Q4_K): a pass of n = 1 .. 16 tokens through gemm(), the block GEMV per
// token up to kBlockGemvMaxTokens (a speculative verification) and the dequantised tiles with
// cuBLAS beyond: the time per pass and per token against one token, where the two paths meet.
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

#include "../csrc/core/tensor_types.h"
#include "common.cuh"
#include "cuda_check.cuh"
#include "dequantize.cuh"
#include "gemm.cuh"
#include "gemv.cuh"
#include "norm.cuh"
#include "quant_gemv.cuh"
#include "random_blocks.h"
#include "swiglu.cuh"

using namespace ffnskip::cuda;
using ffnskip::TensorType;

namespace {

struct Shape {
  const char* model;
  const char* name;
  int rows;
  int cols;
  bool swiglu;  // stacked gate/up rows, SwiGLU epilogue
  bool normed;  // the input is an RMSNorm of the residual stream (folded in decode)
};

const Shape kShapes[] = {
    {"llama2-7b", "qkv", 3 * 4096, 4096, false, true},
    {"llama2-7b", "o", 4096, 4096, false, false},
    {"llama2-7b", "gate_up", 2 * 11008, 4096, true, true},
    {"llama2-7b", "down", 4096, 11008, false, false},
    {"llama2-7b", "lm_head", 32000, 4096, false, true},
    {"llama3-8b", "qkv", 4096 + 2 * 1024, 4096, false, true},
    {"llama3-8b", "o", 4096, 4096, false, false},
    {"llama3-8b", "gate_up", 2 * 14336, 4096, true, true},
    {"llama3-8b", "down", 4096, 14336, false, false},
    {"llama3-8b", "lm_head", 128256, 4096, false, true},
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

// Copies of a matrix of `bytes` so that cycling through them reads device memory, not L2.
int copies_beyond_l2(size_t bytes, size_t l2_bytes) {
  return static_cast<int>(std::max<size_t>(1, (4 * l2_bytes) / bytes + 1));
}

// max |a - b| / max |b|.
double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double max_diff = 0.0, max_value = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(a[i] - b[i])));
    max_value = std::max(max_value, static_cast<double>(std::fabs(b[i])));
  }
  return max_diff / std::max(max_value, 1e-30);
}

// The output of the linear on the host in fp32, once the stream is done: y (Store) or act
// (SwiGLU).
template <typename T>
std::vector<float> read_output(const Shape& s, cudaStream_t stream, const float* y,
                               const T* act) {
  CUDA_CHECK(cudaStreamSynchronize(stream));  // a non-blocking stream: cudaMemcpy does not wait
  std::vector<float> out(s.swiglu ? s.rows / 2 : s.rows);
  if (!s.swiglu) {
    CUDA_CHECK(cudaMemcpy(out.data(), y, sizeof(float) * out.size(), cudaMemcpyDeviceToHost));
    return out;
  }
  std::vector<T> stored(out.size());
  CUDA_CHECK(cudaMemcpy(stored.data(), act, sizeof(T) * stored.size(), cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(stored[i]);
  return out;
}

// The time per call of the dense GEMV in microseconds.
template <typename T>
double bench_shape(const Shape& s, const char* dtype, cublasHandle_t handle, cudaStream_t stream,
                   size_t l2_bytes, int iterations) {
  const size_t weight_count = static_cast<size_t>(s.rows) * s.cols;
  const size_t weight_bytes = sizeof(T) * weight_count;
  const int copies = copies_beyond_l2(weight_bytes, l2_bytes);
  DeviceArray<T> weights(weight_count * copies);
  DeviceArray<T> x(s.cols);
  DeviceArray<float> y_custom(s.rows), y_cublas(s.rows), gate_up(s.rows);
  DeviceArray<T> act_custom(s.rows / 2), act_cublas(s.rows / 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.cols));
  fill_random(weights.data, weight_count * copies, 1, scale);
  fill_random(x.data, s.cols, 2, 1.0f);

  // The GEMV's input: x, or RMSNorm(residual) in its prologue (the decode step's fused form),
  // or the norm kernel first, into normed_x.
  enum class Input { Plain, Folded, NormFirst };
  DeviceArray<float> residual(s.cols), norm_weight(s.cols);
  DeviceArray<T> normed_x(s.cols);
  fill_random(residual.data, s.cols, 4, 3.0f);
  fill_random(norm_weight.data, s.cols, 5, 1.0f);
  auto custom = [&](int copy, Input input) {
    GemvArgs<T> g;
    g.weight = weights.data + weight_count * copy;
    g.rows = s.rows;
    g.cols = s.cols;
    g.x = x.data;
    g.y = y_custom.data;
    g.act = act_custom.data;
    if (input == Input::Folded) {
      g.norm_weight = norm_weight.data;
      g.norm_x = residual.data;
      g.norm_eps = 1e-5f;
    } else if (input == Input::NormFirst) {
      launch_rmsnorm(residual.data, 1, s.cols, norm_weight.data, 1e-5f, normed_x.data, stream);
      g.x = normed_x.data;
    }
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
  auto timed = [&](Input input) {
    return time_us(stream, copies, iterations, [&](int copy) { custom(copy, input); });
  };
  const double custom_us = timed(Input::Plain);
  const double cublas_us = time_us(stream, copies, iterations, cublas);
  const double fold_us = s.normed ? timed(Input::Folded) : NAN;
  const double norm_gemv_us = s.normed ? timed(Input::NormFirst) : NAN;

  // Agreement of the two on copy 0.
  custom(0, Input::Plain);
  const std::vector<float> a = read_output(s, stream, y_custom.data, act_custom.data);
  cublas(0);
  const std::vector<float> b = read_output(s, stream, y_cublas.data, act_cublas.data);
  const double gb = static_cast<double>(weight_bytes) / 1e9;
  std::printf("%-10s %-8s %-5s %6d x %-6d %9.2f %8.0f %9.2f %8.0f %10.2e  %-6s %8.2f %12.2f\n",
              s.model, s.name, dtype, s.rows, s.cols, custom_us, gb / (custom_us * 1e-6),
              cublas_us, gb / (cublas_us * 1e-6), relative_difference(a, b),
              custom_us <= cublas_us ? "custom" : "cublas", fold_us, norm_gemv_us);
  return custom_us;
}

// Random blocks of `type` for a shape (the same seed and scale for every table), uploaded in as
// many copies as copies_beyond_l2 asks for.
struct RandomBlockCopies {
  size_t bytes;  // of one copy
  int copies;
  DeviceArray<uint8_t> blocks;

  RandomBlockCopies(const Shape& s, TensorType type, size_t l2_bytes)
      : bytes(ffnskip::bench::block_format_bytes(type, s.rows, s.cols)),
        copies(copies_beyond_l2(bytes, l2_bytes)),
        blocks(bytes * copies) {
    std::vector<uint8_t> host(bytes);
    ffnskip::bench::fill_random_blocks(type, s.rows, s.cols, 3,
                                       1.0f / std::sqrt(static_cast<float>(s.cols)),
                                       host.data());
    for (int i = 0; i < copies; ++i) {
      CUDA_CHECK(cudaMemcpy(blocks.data + bytes * i, host.data(), bytes, cudaMemcpyHostToDevice));
    }
  }
};

// The GEMV over random blocks of `type`, fp16 activations; dense_us: the fp16 GEMV's time.
void bench_block_shape(const Shape& s, TensorType type, double dense_us, cublasHandle_t handle,
                       cudaStream_t stream, size_t l2_bytes, int iterations) {
  using T = __half;
  const RandomBlockCopies weights(s, type, l2_bytes);
  const size_t bytes = weights.bytes;
  const int copies = weights.copies;
  const DeviceArray<uint8_t>& blocks = weights.blocks;
  DeviceArray<T> x(s.cols);
  fill_random(x.data, s.cols, 2, 1.0f);
  DeviceArray<float> y_blocks(s.rows), y_cublas(s.rows), gate_up(s.rows);
  DeviceArray<T> act_blocks(s.rows / 2), act_cublas(s.rows / 2);
  const GemvOutput output = s.swiglu ? GemvOutput::SwiGLU : GemvOutput::Store;

  auto gemv = [&](int copy) {
    GemvArgs<T> g;
    g.weight = blocks.data + bytes * copy;
    g.weight_type = type;
    g.rows = s.rows;
    g.cols = s.cols;
    g.x = x.data;
    g.y = y_blocks.data;
    g.act = act_blocks.data;
    launch_gemv(g, output, stream);
  };
  const double us = time_us(stream, copies, iterations, gemv);

  gemv(0);
  const std::vector<float> a = read_output(s, stream, y_blocks.data, act_blocks.data);
  {
    // The prefill path on one token: the whole matrix dequantised to fp16, then cuBLAS.
    DeviceArray<T> dense(static_cast<size_t>(s.rows) * s.cols);
    launch_dequantize_rows(blocks.data, type, s.cols, 0, s.rows, dense.data, stream);
    GemmArgs<T> g;
    g.weight = dense.data;
    g.rows = s.rows;
    g.cols = s.cols;
    g.x = x.data;
    g.n = 1;
    g.y = s.swiglu ? gate_up.data : y_cublas.data;
    g.y_stride = s.rows;
    gemm(handle, stream, g);
    if (s.swiglu) launch_swiglu(gate_up.data, 1, s.rows / 2, act_cublas.data, nullptr, stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));  // before the dequantised copy is freed
  }
  const std::vector<float> b = read_output(s, stream, y_cublas.data, act_cublas.data);
  const double dense_bytes = sizeof(T) * static_cast<double>(s.rows) * s.cols;
  std::printf("%-10s %-8s %-5s %6d x %-6d %9.2f %8.0f %8.2fx %8.2fx %10.2e\n", s.model, s.name,
              ffnskip::tensor_type_name(type), s.rows, s.cols, us, bytes / 1e9 / (us * 1e-6),
              dense_us / us, dense_bytes / bytes, relative_difference(a, b));
}

}  // namespace

// A pass of n tokens over random blocks of `type` through gemm() (up to kBlockGemvMaxTokens the
// block GEMV per token, more the dequantised fp16 tiles and cuBLAS), fp16 activations: the time
// per call and per token, against one token.
void bench_pass_shape(const Shape& s, TensorType type, cublasHandle_t handle,
                      cudaStream_t stream, size_t l2_bytes, int iterations) {
  using T = __half;
  constexpr int kMaxTokens = 16;
  const RandomBlockCopies weights(s, type, l2_bytes);
  const size_t bytes = weights.bytes;
  const int copies = weights.copies;
  const DeviceArray<uint8_t>& blocks = weights.blocks;
  DeviceArray<T> x(static_cast<size_t>(kMaxTokens) * s.cols);
  fill_random(x.data, static_cast<size_t>(kMaxTokens) * s.cols, 2, 1.0f);
  DeviceArray<float> y(static_cast<size_t>(kMaxTokens) * s.rows);
  const int64_t scratch_elements =
      gemm_scratch_elements<T>(type, s.rows, s.cols, kGemmTileElements);
  DeviceArray<T> scratch(static_cast<size_t>(scratch_elements));
  double one_token_us = 0.0;
  for (int n : {1, 2, 4, kBlockGemvMaxTokens, kBlockGemvMaxTokens + 1, kMaxTokens}) {
    auto pass = [&](int copy) {
      GemmArgs<T> g;
      g.weight = blocks.data + bytes * copy;
      g.weight_type = type;
      g.rows = s.rows;
      g.cols = s.cols;
      g.x = x.data;
      g.n = n;
      g.y = y.data;
      g.y_stride = s.rows;
      g.scratch = scratch.data;
      g.scratch_elements = scratch_elements;
      gemm(handle, stream, g);
    };
    const double us = time_us(stream, copies, iterations, pass);
    if (n == 1) one_token_us = us;
    std::printf("%-10s %-8s %-5s %15s %3d %-11s %9.2f %9.2f %9.2f\n", s.model, s.name,
                ffnskip::tensor_type_name(type),
                (std::to_string(s.rows) + " x " + std::to_string(s.cols)).c_str(), n,
                n <= kBlockGemvMaxTokens ? "block_gemv" : "tiles", us, us / n, us / one_token_us);
  }
}

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
    std::printf("%-10s %-8s %-5s %15s %9s %8s %9s %8s %10s  %-6s %8s %12s\n", "model", "linear",
                "dtype", "rows x cols", "custom_us", "GB/s", "cublas_us", "GB/s", "rel_diff",
                "faster", "fold_us", "norm_gemv_us");
    std::vector<double> fp16_us;
    for (const Shape& s : kShapes) {
      fp16_us.push_back(bench_shape<__half>(s, "fp16", handle, stream, prop.l2CacheSize,
                                            iterations));
      bench_shape<__nv_bfloat16>(s, "bf16", handle, stream, prop.l2CacheSize, iterations);
    }
    std::printf("\n%-10s %-8s %-5s %15s %9s %8s %9s %9s %10s\n", "model", "linear", "type",
                "rows x cols", "gemv_us", "GB/s", "vs_fp16", "ideal", "rel_diff");
    for (size_t i = 0; i < std::size(kShapes); ++i) {
      for (TensorType type :
           {TensorType::Q8_0, TensorType::Q5_0, TensorType::Q4_K, TensorType::Q6_K}) {
        bench_block_shape(kShapes[i], type, fp16_us[i], handle, stream, prop.l2CacheSize,
                          iterations);
      }
    }
    std::printf("\n%-10s %-8s %-5s %15s %3s %-11s %9s %9s %9s\n", "model", "linear", "type",
                "rows x cols", "n", "path", "pass_us", "per_token", "vs_n=1");
    for (const Shape& s : kShapes) {
      if (std::strcmp(s.model, "llama3-8b") != 0 || std::strcmp(s.name, "lm_head") == 0) continue;
      for (TensorType type : {TensorType::Q8_0, TensorType::Q4_K}) {
        bench_pass_shape(s, type, handle, stream, prop.l2CacheSize, std::max(1, iterations / 4));
      }
    }
    CUBLAS_CHECK(cublasDestroy(handle));
    CUDA_CHECK(cudaStreamDestroy(stream));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gemv: %s\n", e.what());
    return 1;
  }
}
