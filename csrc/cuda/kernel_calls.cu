#include "kernel_calls.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "../core/skip_rule.h"
#include "../core/tensor_types.h"
#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"
#include "decode_attention.cuh"
#include "device.cuh"
#include "dequantize.cuh"
#include "embedding.cuh"
#include "gemm.cuh"
#include "gemv.cuh"
#include "logits.cuh"
#include "norm.cuh"
#include "prefill_attention.cuh"
#include "rope.cuh"
#include "router.cuh"
#include "score.cuh"
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

template <typename P>
P* as(const DeviceMemory& memory) {
  return reinterpret_cast<P*>(memory.get());
}

// `count` host floats on the device as T (rounded), or as they are.
template <typename T>
DeviceMemory device_rounded(cudaStream_t stream, const float* values, int64_t count) {
  return device_buffer(stream, sizeof(T) * count, rounded<T>(values, count).data());
}
DeviceMemory device_floats(cudaStream_t stream, const float* values, int64_t count) {
  return device_buffer(stream, sizeof(float) * count, values);
}

// The type a call's weight is held in on the device: its block format, or T for F32 values.
template <typename T>
TensorType held_weight_type(TensorType type) {
  return type != TensorType::F32 ? type : dense_tensor_type<T>();
}

// The weight of a linear call on the device: its blocks, or its F32 values rounded to T.
template <typename T>
DeviceMemory device_weight(cudaStream_t stream, const void* weight, TensorType type, int rows,
                           int cols) {
  if (type != TensorType::F32) {
    return device_buffer(stream, rows * row_bytes(type, cols), weight);
  }
  const int64_t count = static_cast<int64_t>(rows) * cols;
  return device_rounded<T>(stream, static_cast<const float*>(weight), count);
}

// After the stream's work: `count` elements of T on the device, widened into `out`.
template <typename T>
void copy_widened(const DeviceMemory& memory, int64_t count, float* out) {
  std::vector<T> values(static_cast<size_t>(count));
  CUDA_CHECK(cudaMemcpy(values.data(), memory.get(), sizeof(T) * count, cudaMemcpyDeviceToHost));
  widen(values, out);
}

template <typename V>
void copy_to_host(const DeviceMemory& memory, int64_t count, V* out) {
  CUDA_CHECK(cudaMemcpy(out, memory.get(), sizeof(V) * count, cudaMemcpyDeviceToHost));
}

// The kernel's skip flag, set or not.
DeviceMemory skip_flag(cudaStream_t stream, bool skip) {
  const int32_t flag = skip ? 1 : 0;
  return device_buffer(stream, sizeof(flag), &flag);
}

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
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
  if (!c.gemv && c.norm_weight != nullptr) {
    throw std::invalid_argument("only the GEMV opens with the RMSNorm");
  }
  const int64_t weights = static_cast<int64_t>(c.rows) * c.cols;
  const int outputs = swiglu ? c.rows / 2 : c.rows;
  const int64_t out_count = static_cast<int64_t>(c.n) * outputs;

  const Stream owned_stream = make_stream();  // first: destroyed after the buffers
  cudaStream_t stream = owned_stream.get();
  DeviceMemory weight = device_weight<T>(stream, c.weight, c.weight_type, c.rows, c.cols);
  const int64_t x_count = static_cast<int64_t>(c.n) * c.cols;
  DeviceMemory x = device_buffer(stream, sizeof(T) * x_count, rounded<T>(c.x, x_count).data());
  const bool normed = c.norm_weight != nullptr;
  DeviceMemory norm_x = device_buffer(stream, normed ? sizeof(float) * x_count : 0, c.x);
  DeviceMemory norm_weight =
      device_buffer(stream, normed ? sizeof(float) * c.cols : 0, c.norm_weight);
  DeviceMemory bias = device_buffer(stream, sizeof(float) * c.rows, c.bias);
  DeviceMemory y =
      swiglu ? device_buffer(stream, sizeof(T) * out_count, rounded<T>(c.y, out_count).data())
             : device_buffer(stream, sizeof(float) * out_count, c.y);
  const int32_t flag = c.skip ? 1 : 0;
  DeviceMemory skip_flag = device_buffer(stream, sizeof(flag), &flag);
  const TensorType weight_type = held_weight_type<T>(c.weight_type);
  const float* bias_data = c.bias != nullptr ? reinterpret_cast<float*>(bias.get()) : nullptr;

  if (c.gemv) {
    GemvArgs<T> g;
    g.weight = weight.get();
    g.weight_type = weight_type;
    g.bias = bias_data;
    g.rows = c.rows;
    g.cols = c.cols;
    g.x = reinterpret_cast<T*>(x.get());
    if (normed) {
      g.norm_x = reinterpret_cast<float*>(norm_x.get());
      g.norm_weight = reinterpret_cast<float*>(norm_weight.get());
      g.norm_eps = c.norm_eps;
    }
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
    const int64_t scratch_elements =
        blocks ? gemm_scratch_elements<T>(weight_type, c.rows, c.cols,
                                          c.tile_elements > 0 ? c.tile_elements : weights)
               : 0;
    DeviceMemory scratch = device_buffer(stream, sizeof(T) * scratch_elements);
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
    g.scratch_elements = scratch_elements;
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
  require(c.rows > 0, "dequantize: bad shape");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  DeviceMemory data = device_buffer(stream, c.rows * row_bytes(c.type, c.cols), c.data);
  const int64_t count = static_cast<int64_t>(c.rows) * c.cols;
  DeviceMemory out = device_buffer(stream, sizeof(T) * count);
  launch_dequantize_rows(data.get(), c.type, c.cols, 0, c.rows, as<T>(out), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_widened<T>(out, count, c.out);
}

template <typename T>
void run_in(const CudaEmbeddingCall& c) {
  if (c.type != TensorType::F32) check_block_format(c.type, c.cols);
  require(c.rows > 0 && c.cols > 0 && c.n > 0, "embedding: bad shape");
  for (int i = 0; i < c.n; ++i) require(c.ids[i] >= 0 && c.ids[i] < c.rows, "row id out of range");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  DeviceMemory table = device_weight<T>(stream, c.table, c.type, c.rows, c.cols);
  DeviceMemory ids = device_buffer(stream, sizeof(int32_t) * c.n, c.ids);
  const int64_t count = static_cast<int64_t>(c.n) * c.cols;
  DeviceMemory out = device_buffer(stream, sizeof(float) * count);
  SkipState before;  // none of the values begin_token sets
  before.dense_token = -1;
  before.budget = -1;
  before.in_run = -1;
  before.prev_score = 2.0f;
  DeviceMemory state = device_buffer(stream, sizeof(SkipState), &before);
  DeviceMemory decode_index = device_buffer(stream, sizeof(int32_t), &c.decode_index);
  TokenStart start;
  if (c.rule != nullptr) {
    start.rule = *c.rule;
    start.state = as<SkipState>(state);
    start.decode_index = as<int32_t>(decode_index);
  }
  launch_embedding<T>(table.get(), held_weight_type<T>(c.type), as<int32_t>(ids), c.n, c.cols,
                      as<float>(out), start, stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_to_host(out, count, c.out);
  if (c.rule == nullptr) return;
  SkipState after;
  CUDA_CHECK(cudaMemcpy(&after, state.get(), sizeof(after), cudaMemcpyDeviceToHost));
  c.started[0] = static_cast<float>(after.dense_token);
  c.started[1] = static_cast<float>(after.budget);
  c.started[2] = static_cast<float>(after.in_run);
  c.started[3] = after.prev_score;
}

template <typename T>
void run_in(const CudaRmsNormCall& c) {
  require(c.n > 0 && c.dim > 0, "rms_norm: bad shape");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  const int64_t count = static_cast<int64_t>(c.n) * c.dim;
  DeviceMemory x = device_floats(stream, c.x, count);
  DeviceMemory weight = device_floats(stream, c.weight, c.dim);
  DeviceMemory out = device_buffer(stream, sizeof(T) * count);
  launch_rmsnorm(as<float>(x), c.n, c.dim, as<float>(weight), c.eps, as<T>(out), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_widened<T>(out, count, c.out);
}

template <typename T>
void run_in(const CudaRopeCall& c) {
  require(c.n > 0 && c.pos >= 0 && c.num_heads > 0 && c.kv_heads > 0 && c.head_dim > 0 &&
              c.head_dim % 2 == 0 && c.cache_rows >= c.pos + c.n,
          "rope: bad shape");
  const bool fused = c.weight != nullptr;
  if (fused) {
    require(c.n == 1 && c.cols > 0, "rope: the fused projection runs one token");
    if (c.weight_type != TensorType::F32) check_block_format(c.weight_type, c.cols);
  }
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  const int q_dim = c.num_heads * c.head_dim;
  const int kv_dim = c.kv_heads * c.head_dim;
  const int stride = q_dim + 2 * kv_dim;
  const int64_t qkv_count = static_cast<int64_t>(c.n) * stride;
  const int64_t cache_count = static_cast<int64_t>(c.cache_rows) * kv_dim;
  DeviceMemory qkv = device_floats(stream, c.qkv, qkv_count);
  DeviceMemory pos = device_buffer(stream, sizeof(int32_t), &c.pos);
  DeviceMemory inv_freq = device_floats(stream, c.inv_freq, c.head_dim / 2);
  DeviceMemory k = device_rounded<T>(stream, c.k_cache, cache_count);
  DeviceMemory v = device_rounded<T>(stream, c.v_cache, cache_count);
  DeviceMemory flag = skip_flag(stream, c.skip);
  RopeKvLayout layout;
  layout.q_dim = q_dim;
  layout.kv_dim = kv_dim;
  layout.head_dim = c.head_dim;
  layout.pos = as<int32_t>(pos);
  layout.inv_freq = as<float>(inv_freq);
  layout.interleaved = c.interleaved;
  if (fused) {
    const int first_row = c.rotate_q ? 0 : q_dim;
    const int rows = stride - first_row;
    require(c.split_row >= 0 && c.split_row < rows, "rope: split_row outside the rows");
    DeviceMemory weight = device_weight<T>(stream, c.weight, c.weight_type, rows, c.cols);
    DeviceMemory bias = device_floats(stream, c.bias, c.bias != nullptr ? rows : 0);
    DeviceMemory x = device_rounded<T>(stream, c.x, c.cols);
    const TensorType held = held_weight_type<T>(c.weight_type);
    const int64_t row_size = row_bytes(held, c.cols);
    const int splits[3] = {0, c.split_row > 0 ? c.split_row : rows, rows};
    for (int part = 0; part < 2 && splits[part] < rows; ++part) {
      const int begin = splits[part], end = splits[part + 1];
      GemvArgs<T> g;
      g.weight = as<uint8_t>(weight) + begin * row_size;
      g.weight_type = held;
      g.bias = c.bias != nullptr ? as<float>(bias) + begin : nullptr;
      g.rows = end - begin;
      g.cols = c.cols;
      g.x = as<T>(x);
      g.y = as<float>(qkv) + first_row + begin;
      g.skip_flag = as<int32_t>(flag);
      g.first_row = first_row + begin;
      g.rope = layout;
      g.k_cache = as<T>(k);
      g.v_cache = as<T>(v);
      launch_gemv(g, GemvOutput::RopeKv, stream);
    }
  } else {
    RopeKvArgs a;
    a.qkv = as<float>(qkv);
    a.n = c.n;
    a.q_heads = c.rotate_q ? c.num_heads : 0;
    a.layout = layout;
    a.skip_flag = as<int32_t>(flag);
    launch_rope_kv_write(a, as<T>(k), as<T>(v), stream);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_to_host(qkv, qkv_count, c.qkv);
  copy_widened<T>(k, cache_count, c.k_cache);
  copy_widened<T>(v, cache_count, c.v_cache);
}

template <typename T>
void run_in(const CudaSwigluCall& c) {
  require(c.n > 0 && c.inter > 0, "swiglu: bad shape");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  const int64_t count = static_cast<int64_t>(c.n) * c.inter;
  DeviceMemory gate_up = device_floats(stream, c.gate_up, 2 * count);
  DeviceMemory act = device_rounded<T>(stream, c.act, count);
  DeviceMemory flag = skip_flag(stream, c.skip);
  launch_swiglu(as<float>(gate_up), c.n, c.inter, as<T>(act), as<int32_t>(flag), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_widened<T>(act, count, c.act);
}

// The checks both attention kernels need: GQA groups, head_dim within the kernels' arrays.
void check_attention_shape(int num_heads, int kv_heads, int head_dim, int rows_needed,
                           int cache_rows) {
  require(num_heads > 0 && kv_heads > 0 && num_heads % kv_heads == 0 && head_dim > 0 &&
              head_dim <= kMaxHeadDim && cache_rows >= rows_needed,
          "attention: bad shape");
}

template <typename T>
void run_in(const CudaDecodeAttentionCall& c) {
  check_attention_shape(c.num_heads, c.kv_heads, c.head_dim, c.pos + 1, c.cache_rows);
  require(c.pos >= 0 && c.num_splits > 0, "decode attention: bad position or splits");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  const int64_t q_count = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t cache_count = static_cast<int64_t>(c.cache_rows) * c.kv_heads * c.head_dim;
  DeviceMemory q = device_floats(stream, c.q, q_count);
  DeviceMemory k = device_rounded<T>(stream, c.k_cache, cache_count);
  DeviceMemory v = device_rounded<T>(stream, c.v_cache, cache_count);
  DeviceMemory pos = device_buffer(stream, sizeof(int32_t), &c.pos);
  DeviceMemory partial = device_buffer(
      stream, sizeof(float) * decode_attention_partial_floats(c.num_heads, c.head_dim,
                                                               c.num_splits));
  DeviceMemory out = device_rounded<T>(stream, c.out, q_count);
  DeviceMemory flag = skip_flag(stream, c.skip);
  DecodeAttentionArgs a;
  a.q = as<float>(q);
  a.num_heads = c.num_heads;
  a.num_kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  a.pos = as<int32_t>(pos);
  a.num_splits = c.num_splits;
  a.partial = as<float>(partial);
  a.skip_flag = as<int32_t>(flag);
  launch_decode_attention(a, as<T>(k), as<T>(v), as<T>(out), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_widened<T>(out, q_count, c.out);
}

template <typename T>
void run_in(const CudaPrefillAttentionCall& c) {
  check_attention_shape(c.num_heads, c.kv_heads, c.head_dim, c.pos + c.n, c.cache_rows);
  require(c.pos >= 0 && c.n > 0, "prefill attention: bad position or token count");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  const int q_dim = c.num_heads * c.head_dim;
  const int64_t q_count = static_cast<int64_t>(c.n) * q_dim;
  const int64_t cache_count = static_cast<int64_t>(c.cache_rows) * c.kv_heads * c.head_dim;
  DeviceMemory q = device_floats(stream, c.q, q_count);
  DeviceMemory k = device_rounded<T>(stream, c.k_cache, cache_count);
  DeviceMemory v = device_rounded<T>(stream, c.v_cache, cache_count);
  DeviceMemory pos = device_buffer(stream, sizeof(int32_t), &c.pos);
  DeviceMemory out = device_buffer(stream, sizeof(T) * q_count);
  PrefillAttentionArgs a;
  a.qkv = as<float>(q);
  a.qkv_stride = q_dim;
  a.n = c.n;
  a.pos = as<int32_t>(pos);
  a.num_heads = c.num_heads;
  a.num_kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  launch_prefill_attention(a, as<T>(k), as<T>(v), as<T>(out), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_widened<T>(out, q_count, c.out);
}

template <typename T>
void run_in(const CudaLogitsCall& c) {
  if (c.lm_head_type != TensorType::F32) check_block_format(c.lm_head_type, c.hidden);
  require(c.hidden > 0 && c.vocab > 0, "logits: bad shape");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  DeviceMemory lm_head = device_weight<T>(stream, c.lm_head, c.lm_head_type, c.vocab, c.hidden);
  DeviceMemory x = device_floats(stream, c.x, c.hidden);
  DeviceMemory final_norm = device_floats(stream, c.final_norm, c.hidden);
  DeviceMemory normed = device_buffer(stream, sizeof(T) * c.hidden);
  DeviceMemory logits = device_buffer(stream, sizeof(float) * c.vocab);
  launch_logits_head(as<float>(x), c.hidden, as<float>(final_norm), c.eps, lm_head.get(),
                     held_weight_type<T>(c.lm_head_type), c.vocab, as<T>(normed),
                     as<float>(logits), stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_to_host(logits, c.vocab, c.logits);
}

// The kernels that read and write fp32 only.
void run_fp32(const CudaRouteCall& c) {
  require(c.n > 0 && c.hidden > 0, "route: bad shape");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  DeviceMemory x = device_floats(stream, c.x, static_cast<int64_t>(c.n) * c.hidden);
  DeviceMemory norm_weight = device_floats(stream, c.norm_weight, c.hidden);
  DeviceMemory weight = device_floats(stream, c.weight, c.hidden);
  DeviceMemory bias = device_floats(stream, &c.bias, 1);
  DeviceMemory layer_off = device_buffer(stream, sizeof(int32_t));
  DeviceMemory gate = device_buffer(stream, sizeof(float));
  RouteArgs a;
  a.x = as<float>(x);
  a.norm_weight = as<float>(norm_weight);
  a.eps = c.eps;
  a.n = c.n;
  a.hidden = c.hidden;
  a.weight = as<float>(weight);
  a.bias = as<float>(bias);
  a.threshold_logit = c.threshold_logit;
  a.layer_off = as<int32_t>(layer_off);
  a.gate = as<float>(gate);
  launch_route_layer(a, stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  copy_to_host(layer_off, 1, c.layer_off);
  copy_to_host(gate, 1, c.gate);
}

void run_fp32(const CudaScoreCall& c) {
  require(c.hidden > 0 && (c.ffn_out != nullptr || c.b != nullptr), "score: bad call");
  const Stream owned_stream = make_stream();
  cudaStream_t stream = owned_stream.get();
  DeviceMemory x = device_floats(stream, c.x, c.hidden);
  DeviceMemory score = device_floats(stream, c.score, 1);
  DeviceMemory flag = skip_flag(stream, c.skip);
  if (c.ffn_out != nullptr) {
    const SkipState fresh;
    DeviceMemory state = device_buffer(stream, sizeof(SkipState), &fresh);
    DeviceMemory ffn_out = device_floats(stream, c.ffn_out, c.hidden);
    launch_residual_add_score(as<float>(x), as<float>(ffn_out), c.hidden, as<SkipState>(state),
                              as<int32_t>(flag), as<float>(score), stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    copy_to_host(x, c.hidden, c.x);
  } else {
    DeviceMemory b = device_floats(stream, c.b, c.hidden);
    launch_cosine(as<float>(x), as<float>(b), c.hidden, as<int32_t>(flag), as<float>(score),
                  stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  copy_to_host(score, 1, c.score);
}

}  // namespace

void run_linear(const CudaLinearCall& call) {
  with_storage_type(call.activation, [&](auto t) { linear_in<decltype(t)>(call); });
}

void run_dequantize(const CudaDequantizeCall& call) {
  with_storage_type(call.out_type, [&](auto t) { dequantize_in<decltype(t)>(call); });
}

void run_kernel(const CudaKernelCall& call) {
  std::visit(
      [](const auto& c) {
        using Call = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<Call, CudaRouteCall> || std::is_same_v<Call, CudaScoreCall>) {
          run_fp32(c);
        } else {
          with_storage_type(c.activation, [&](auto t) { run_in<decltype(t)>(c); });
        }
      },
      call);
}

}  // namespace ffnskip::cuda
