// The CUDA backend: weights in fp32, fp16 or bf16, fp32 residual stream and accumulation,
// cuBLAS for prefill linears, a GEMV kernel for decode linears, and every decode step replayed
// from one CUDA graph captured on the first step after each policy change.
//
// What a decode step depends on that changes from token to token lives in device memory: the
// token and its position (one async copy from pinned memory before the launch) and the skip
// state (updated by the rule's kernels inside the graph). The per-layer FFN decisions of the
// adaptive and random policies are made on the device by the FFN's RMSNorm kernel, which writes
// a flag; the FFN's other kernels read the flag first and return at once when it is set, so a
// skipped FFN reads none of its weights (ffn_gate.cuh). The logits and the step record come
// back with one copy and one sync. FiRST routes a sequence on the device in the pass that starts
// it, and the routed layers' kernels read the resulting per-layer flag (router.cuh).
#include "cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "cuda_check.cuh"
#include "decode_attention.cuh"
#include "embedding.cuh"
#include "ffn_gate.cuh"
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

constexpr int kMaxPrefillChunk = 512;  // tokens per prefill pass; longer prompts run in chunks
static_assert(kMaxPrefillChunk >= kRouterPromptTokens, "FiRST routes on the first chunk");
constexpr size_t kCublasWorkspaceBytes = 32u << 20;  // fixed, so that cuBLAS calls can be captured
constexpr size_t kUploadStagingBytes = 64u << 20;
constexpr size_t kArenaAlignment = 256;

// Owners of CUDA objects. Deleters ignore errors: they run in destructors and while unwinding.
struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};
struct HostFree {
  void operator()(void* p) const { cudaFreeHost(p); }
};
struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
struct CublasDestroy {
  void operator()(cublasHandle_t h) const { cublasDestroy(h); }
};
struct GraphDestroy {
  void operator()(cudaGraph_t g) const { cudaGraphDestroy(g); }
};
struct GraphExecDestroy {
  void operator()(cudaGraphExec_t g) const { cudaGraphExecDestroy(g); }
};
using DeviceMemory = std::unique_ptr<char, DeviceFree>;
using PinnedMemory = std::unique_ptr<char, HostFree>;
using Stream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;
using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;
using CublasHandle = std::unique_ptr<std::remove_pointer_t<cublasHandle_t>, CublasDestroy>;
using Graph = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, GraphDestroy>;
using GraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDestroy>;

Stream make_stream() {
  cudaStream_t s = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return Stream(s);
}

Event make_event() {
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return Event(e);
}

PinnedMemory make_pinned(size_t bytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaMallocHost(&p, bytes));
  return PinnedMemory(static_cast<char*>(p));
}

// Makes `device` current for the guard's scope and restores the caller's device afterwards
// (the caller may be a thread of another library that uses another device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device_) CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

std::string cuda_error_text(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}

// Throws std::invalid_argument saying why when the process has no usable CUDA device.
void require_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    throw std::invalid_argument(
        "device='cuda' is not available: no usable CUDA device (cudaGetDeviceCount: " +
        cuda_error_text(status) + "; is an NVIDIA driver installed and a GPU visible?)");
  }
  if (count == 0) {
    throw std::invalid_argument("device='cuda' is not available: no CUDA device is visible");
  }
}

std::string gigabytes(size_t bytes) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.2f GB (%zu bytes)", static_cast<double>(bytes) / 1e9,
                bytes);
  return text;
}

bool env_equals(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

// Carves one device allocation into aligned pieces. Run once with no memory to measure, then
// over the allocation to hand out pointers: both runs take the same pieces in the same order.
class Arena {
 public:
  explicit Arena(char* base = nullptr) : base_(base) {}

  template <typename U>
  U* take(size_t count) {
    offset_ = (offset_ + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
    U* p = base_ != nullptr ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(U);
    return p;
  }
  size_t size() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// Bytes of each part of the arena, for the out-of-memory message.
struct ArenaSizes {
  size_t weights = 0;
  size_t kv_cache = 0;
  size_t buffers = 0;
  size_t total() const { return weights + kv_cache + buffers; }
};

// The step output, contiguous so that one copy brings it back: the logits, then the record.
struct StepOutputLayout {
  size_t score = 0, layer_score = 0, ffn_skipped = 0, layer_skipped = 0, bytes = 0;

  StepOutputLayout(int vocab, int layers) {
    const size_t floats = sizeof(float);
    score = floats * vocab;  // logits at offset 0
    layer_score = score + floats * layers;
    ffn_skipped = layer_score + floats * layers;
    layer_skipped = ffn_skipped + layers;
    bytes = layer_skipped + layers;
  }
};

template <typename T>
struct DeviceLinear {
  T* weight = nullptr;    // [rows, cols]
  float* bias = nullptr;  // [rows] or null
  int rows = 0;
  int cols = 0;
};

template <typename T>
struct DeviceLayer {
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
  DeviceLinear<T> qkv;      // q, k, v rows stacked
  DeviceLinear<T> o;
  DeviceLinear<T> gate_up;  // rows interleaved: gate row i at 2i, up row i at 2i + 1
  DeviceLinear<T> down;
};

std::vector<float> values_of(const TensorView& t) {
  return std::vector<float>(t.data, t.data + t.numel());
}

// The biases of stacked parts, zeros for parts without one; empty when no part has a bias.
std::vector<float> stacked_bias(std::initializer_list<const LinearView*> parts) {
  bool any = false;
  for (const LinearView* p : parts) any = any || p->bias.data != nullptr;
  std::vector<float> bias;
  if (!any) return bias;
  for (const LinearView* p : parts) {
    const int64_t rows = p->weight.shape[0];
    if (p->bias.data != nullptr) {
      bias.insert(bias.end(), p->bias.data, p->bias.data + rows);
    } else {
      bias.insert(bias.end(), rows, 0.0f);
    }
  }
  return bias;
}

std::vector<float> interleaved_bias(const LinearView& gate, const LinearView& up) {
  std::vector<float> bias;
  if (gate.bias.data == nullptr && up.bias.data == nullptr) return bias;
  const int64_t rows = gate.weight.shape[0];
  bias.reserve(2 * rows);
  for (int64_t i = 0; i < rows; ++i) {
    bias.push_back(gate.bias.data != nullptr ? gate.bias.data[i] : 0.0f);
    bias.push_back(up.bias.data != nullptr ? up.bias.data[i] : 0.0f);
  }
  return bias;
}

template <typename T>
class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& config, const ModelView& model, int max_seq_len)
      : config_(config),
        max_seq_len_(max_seq_len),
        chunk_tokens_(std::min(max_seq_len, kMaxPrefillChunk)),
        out_layout_(config.vocab_size, config.num_layers),
        use_graphs_(!env_equals("FFNSKIP_CUDA_GRAPHS", "0")),
        cublas_decode_(env_equals("FFNSKIP_DECODE_GEMV", "cublas")) {
    if (config.head_dim > kMaxHeadDim) {
      throw std::invalid_argument("the CUDA backend supports head_dim up to " +
                                  std::to_string(kMaxHeadDim) + ", the model has " +
                                  std::to_string(config.head_dim));
    }
    CUDA_CHECK(cudaGetDevice(&device_));
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    if (prop.major < 8) {
      throw std::invalid_argument(std::string("the CUDA backend needs compute capability 8.0 or "
                                              "newer; ") + prop.name + " has " +
                                  std::to_string(prop.major) + "." + std::to_string(prop.minor));
    }
    num_splits_ = decode_attention_splits(config.num_heads, config.num_kv_heads,
                                          prop.multiProcessorCount, max_seq_len);
    stream_ = make_stream();

    Arena measure;
    ArenaSizes sizes;
    carve(measure, model, sizes);
    arena_ = allocate_arena(sizes, prop.name);
    Arena arena(arena_.get());
    carve(arena, model, sizes);

    cublasHandle_t handle = nullptr;
    CUBLAS_CHECK(cublasCreate(&handle));
    cublas_.reset(handle);
    CUBLAS_CHECK(cublasSetStream(handle, stream_.get()));
    CUBLAS_CHECK(cublasSetWorkspace(handle, cublas_workspace_, kCublasWorkspaceBytes));

    host_input_ = make_pinned(sizeof(int32_t) * (chunk_tokens_ + 1));
    host_output_ = make_pinned(out_layout_.bytes);
    input_copied_ = make_event();

    upload_weights(model);
    SkipPolicy dense;
    dense.rule.num_layers = config.num_layers;
    set_policy(dense, false);
    reset_state();
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  }

  ~CudaBackend() override {
    if (stream_) cudaStreamSynchronize(stream_.get());  // nothing in flight when memory goes
  }

  void forward(const int32_t* tokens, int n, int pos, const LayerLoop& layers, float* logits,
               StepRecord* record) override {
    DeviceGuard guard(device_);
    if (record != nullptr) {
      if (n != 1) throw std::logic_error("CUDA backend: a decode step has exactly one token");
      decode_step(tokens[0], pos, layers, logits, *record);
      return;
    }
    int count = 0;
    for (int done = 0; done < n; done += count) {
      count = std::min(chunk_tokens_, n - done);
      upload_input(pos + done, tokens + done, count);
      pass_routes_ = routes_sequence(pos + done);
      enqueue_pass(count, /*decode=*/false, layers);
    }
    pass_routes_ = false;
    enqueue_logits(count - 1);
    CUDA_CHECK(cudaMemcpyAsync(host_output_.get(), step_out_,
                               sizeof(float) * config_.vocab_size, cudaMemcpyDeviceToHost,
                               stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    std::memcpy(logits, host_output_.get(), sizeof(float) * config_.vocab_size);
  }

  void attention_block(int layer) override {
    const AttentionMode mode = plan(layer).attention;
    if (mode == AttentionMode::Skip) return;
    const DeviceLayer<T>& w = layers_[layer];
    const int n = pass_tokens_;
    const int hidden = config_.hidden_size;
    const int q_dim = config_.q_dim();
    const int kv_dim = config_.kv_dim();
    const int qkv_dim = q_dim + 2 * kv_dim;
    cudaStream_t stream = stream_.get();
    if (pass_decode_ && compute_scores_) {  // x_l, for the layer score
      CUDA_CHECK(cudaMemcpyAsync(layer_input_, x_, sizeof(float) * hidden,
                                 cudaMemcpyDeviceToDevice, stream));
    }
    launch_rmsnorm(x_, n, hidden, w.attn_norm, config_.rms_norm_eps, xn_, stream);
    const int32_t* layer_off = routed_flag(layer);
    if (layer_off != nullptr && pass_routes_) route(layer, n);

    RopeKvArgs rope;
    rope.qkv = qkv_;
    rope.qkv_stride = qkv_dim;
    rope.n = n;
    rope.pos = pass_pos();
    rope.q_heads = config_.num_heads;
    rope.kv_heads = config_.num_kv_heads;
    rope.head_dim = config_.head_dim;
    rope.q_dim = q_dim;
    rope.inv_freq = inv_freq_;
    rope.skip_flag = layer_off;
    T* k_cache = k_cache_ + static_cast<int64_t>(layer) * max_seq_len_ * kv_dim;
    T* v_cache = v_cache_ + static_cast<int64_t>(layer) * max_seq_len_ * kv_dim;

    if (mode == AttentionMode::KVOnly) {  // early exit: only the K/V rows of the projection
      DeviceLinear<T> kv = w.qkv;
      kv.weight += static_cast<int64_t>(q_dim) * hidden;
      if (kv.bias != nullptr) kv.bias += q_dim;
      kv.rows = 2 * kv_dim;
      linear(kv, xn_, n, qkv_ + q_dim, qkv_dim, /*accumulate=*/false, layer_off);
      rope.q_heads = 0;
      launch_rope_kv_write(rope, k_cache, v_cache, stream);
      return;
    }
    linear(w.qkv, xn_, n, qkv_, qkv_dim, /*accumulate=*/false, layer_off);
    launch_rope_kv_write(rope, k_cache, v_cache, stream);
    if (pass_decode_) {
      DecodeAttentionArgs attention;
      attention.q = qkv_;
      attention.num_heads = config_.num_heads;
      attention.num_kv_heads = config_.num_kv_heads;
      attention.head_dim = config_.head_dim;
      attention.pos = pass_pos();
      attention.num_splits = num_splits_;
      attention.partial = attention_partial_;
      attention.skip_flag = layer_off;
      launch_decode_attention(attention, k_cache, v_cache, attn_, stream);
    } else {
      PrefillAttentionArgs attention;
      attention.qkv = qkv_;
      attention.qkv_stride = qkv_dim;
      attention.n = n;
      attention.pos = pass_pos();
      attention.num_heads = config_.num_heads;
      attention.num_kv_heads = config_.num_kv_heads;
      attention.head_dim = config_.head_dim;
      launch_prefill_attention(attention, k_cache, v_cache, attn_, stream);
    }
    residual_linear(w.o, attn_, n, layer_off);
  }

  void ffn_block(int layer) override {
    const LayerPlan layer_plan = plan(layer);
    run_ffn(layer, layer_plan.ffn);
    if (pass_decode_ && compute_scores_ && layer_plan.attention != AttentionMode::Skip) {
      launch_cosine(layer_input_, x_, config_.hidden_size, routed_flag(layer),
                    record_layer_score() + layer, stream_.get());
    }
  }

  void set_policy(const SkipPolicy& policy, bool compute_scores) override {
    DeviceGuard guard(device_);
    const int layers = config_.num_layers;
    std::vector<LayerPlan> prefill(layers), decode(layers);
    for (int l = 0; l < layers; ++l) {
      prefill[l] = plan_layer(policy, l, false);
      decode[l] = plan_layer(policy, l, true);
    }
    // The parts of the step record the graph does not write every step: NaN scores, and the
    // flags that the static plan decides. Decided FFNs and computed scores are rewritten by
    // the graph's kernels at every step.
    std::vector<float> nan_scores(2 * static_cast<size_t>(layers),
                                  std::numeric_limits<float>::quiet_NaN());
    std::vector<uint8_t> flags(2 * static_cast<size_t>(layers));
    for (int l = 0; l < layers; ++l) {
      flags[l] = decode[l].ffn == FFNMode::Skip ? 1 : 0;
      flags[layers + l] = decode[l].attention != AttentionMode::Run ? 1 : 0;
    }
    // From pageable memory: each call returns once the source has been staged.
    CUDA_CHECK(cudaMemcpyAsync(step_out_ + out_layout_.score, nan_scores.data(),
                               sizeof(float) * nan_scores.size(), cudaMemcpyHostToDevice,
                               stream_.get()));
    // FiRST after FiRST keeps the sequence's routing and its flags: the decoder changes
    // policies mid-sequence only so (or to toggle compute_scores), and a new sequence routes
    // afresh anyway.
    const bool keeps_routing =
        policy.rule.kind == PolicyKind::FiRST && policy_.rule.kind == PolicyKind::FiRST;
    if (!keeps_routing) {
      CUDA_CHECK(cudaMemcpyAsync(step_out_ + out_layout_.ffn_skipped, flags.data(),
                                 flags.size(), cudaMemcpyHostToDevice, stream_.get()));
    }
    if (policy.rule.kind == PolicyKind::FiRST) {
      CUDA_CHECK(cudaMemcpyAsync(router_weight_, policy.router_weight.data(),
                                 sizeof(float) * policy.router_weight.size(),
                                 cudaMemcpyHostToDevice, stream_.get()));
      CUDA_CHECK(cudaMemcpyAsync(router_bias_, policy.router_bias.data(),
                                 sizeof(float) * policy.router_bias.size(),
                                 cudaMemcpyHostToDevice, stream_.get()));
    }
    policy_ = policy;
    compute_scores_ = compute_scores;
    scores_ = compute_scores || policy.rule.kind == PolicyKind::FFNSkip;
    threshold_logit_ = router_threshold_logit(policy.rule.threshold);
    prefill_plan_ = std::move(prefill);
    decode_plan_ = std::move(decode);
    decode_graph_.reset();  // captured again, for this policy, at the next decode step
    if (!keeps_routing) run_every_layer();
  }

  void reset_state() override {
    DeviceGuard guard(device_);
    const SkipState fresh;
    CUDA_CHECK(cudaMemcpyAsync(state_, &fresh, sizeof(fresh), cudaMemcpyHostToDevice,
                               stream_.get()));
    run_every_layer();
  }

  void sequence_layers(std::vector<uint8_t>& active, std::vector<float>& gate) const override {
    DeviceGuard guard(device_);
    const size_t layers = static_cast<size_t>(config_.num_layers);
    std::vector<int32_t> off(layers);
    gate.resize(layers);
    CUDA_CHECK(cudaMemcpyAsync(off.data(), layer_off_, sizeof(int32_t) * layers,
                               cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaMemcpyAsync(gate.data(), router_gate_, sizeof(float) * layers,
                               cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    active.resize(layers);
    for (size_t l = 0; l < layers; ++l) active[l] = off[l] != 0 ? 0 : 1;
  }

  // The cache is one fixed allocation (captured graphs hold its addresses): FiRST's skipped
  // layers neither write nor read theirs, but it stays allocated.
  int64_t kv_cache_bytes() const override { return static_cast<int64_t>(kv_cache_bytes_); }

 private:
  // ---- setup ----

  // Takes every device piece from `arena`: weights, then the KV cache, then the buffers.
  void carve(Arena& arena, const ModelView& model, ArenaSizes& sizes) {
    const ModelConfig& c = config_;
    const int hidden = c.hidden_size;
    const int q_dim = c.q_dim(), kv_dim = c.kv_dim(), inter = c.intermediate_size;
    auto linear_piece = [&](int rows, int cols, bool bias) {
      DeviceLinear<T> l;
      l.weight = arena.take<T>(static_cast<size_t>(rows) * cols);
      l.bias = bias ? arena.take<float>(rows) : nullptr;
      l.rows = rows;
      l.cols = cols;
      return l;
    };
    auto has_bias = [](std::initializer_list<const LinearView*> parts) {
      for (const LinearView* p : parts) {
        if (p->bias.data != nullptr) return true;
      }
      return false;
    };

    const size_t table = static_cast<size_t>(c.vocab_size) * hidden;
    embed_ = arena.take<T>(table);
    lm_head_ = c.tie_word_embeddings ? embed_ : arena.take<T>(table);
    final_norm_ = arena.take<float>(hidden);
    inv_freq_ = arena.take<float>(c.head_dim / 2);
    layers_.assign(c.num_layers, DeviceLayer<T>{});
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerView& v = model.layers[l];
      DeviceLayer<T>& d = layers_[l];
      d.attn_norm = arena.take<float>(hidden);
      d.ffn_norm = arena.take<float>(hidden);
      d.qkv = linear_piece(q_dim + 2 * kv_dim, hidden, has_bias({&v.q, &v.k, &v.v}));
      d.o = linear_piece(hidden, q_dim, has_bias({&v.o}));
      d.gate_up = linear_piece(2 * inter, hidden, has_bias({&v.gate, &v.up}));
      d.down = linear_piece(hidden, inter, has_bias({&v.down}));
    }
    sizes.weights = arena.size();

    const size_t cache = static_cast<size_t>(c.num_layers) * max_seq_len_ * kv_dim;
    k_cache_ = arena.take<T>(cache);
    v_cache_ = arena.take<T>(cache);
    sizes.kv_cache = arena.size() - sizes.weights;
    kv_cache_bytes_ = sizes.kv_cache;

    const size_t tokens = chunk_tokens_;  // rows of the per-token buffers
    x_ = arena.take<float>(tokens * hidden);
    xn_ = arena.take<T>(tokens * hidden);
    qkv_ = arena.take<float>(tokens * (q_dim + 2 * kv_dim));
    attn_ = arena.take<T>(tokens * q_dim);
    gate_up_ = arena.take<float>(tokens * 2 * inter);
    act_ = arena.take<T>(tokens * inter);
    ffn_out_ = arena.take<float>(hidden);
    layer_input_ = arena.take<float>(hidden);
    attention_partial_ = arena.take<float>(
        decode_attention_partial_floats(c.num_heads, c.head_dim, num_splits_));
    pass_input_ = arena.take<int32_t>(tokens + 1);
    state_ = arena.take<SkipState>(1);
    skip_flags_ = arena.take<int32_t>(c.num_layers);
    residual_delta_ = arena.take<float>(tokens * hidden);
    router_weight_ = arena.take<float>(static_cast<size_t>(c.num_layers) * hidden);
    router_bias_ = arena.take<float>(c.num_layers);
    layer_off_ = arena.take<int32_t>(c.num_layers);
    router_gate_ = arena.take<float>(c.num_layers);
    step_out_ = arena.take<char>(out_layout_.bytes);
    cublas_workspace_ = arena.take<char>(kCublasWorkspaceBytes);
    sizes.buffers = arena.size() - sizes.weights - sizes.kv_cache;
  }

  // One allocation for everything; when it does not fit, a clear error and nothing allocated.
  static DeviceMemory allocate_arena(const ArenaSizes& sizes, const std::string& device_name) {
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    void* p = nullptr;
    const size_t bytes = sizes.total();
    const cudaError_t status =
        bytes <= free_bytes ? cudaMalloc(&p, bytes) : cudaErrorMemoryAllocation;
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // not sticky: clear it
      throw std::invalid_argument(
          "out of GPU memory on " + device_name + ": the model needs " + gigabytes(bytes) +
          " (weights " + gigabytes(sizes.weights) + ", KV cache " + gigabytes(sizes.kv_cache) +
          ", buffers " + gigabytes(sizes.buffers) + "), but only " + gigabytes(free_bytes) +
          " of " + gigabytes(total_bytes) + " are free; nothing was kept allocated "
          "(a smaller max_seq_len shrinks the KV cache)");
    }
    CUDA_CHECK(status);
    return DeviceMemory(static_cast<char*>(p));
  }

  void upload_weights(const ModelView& model) {
    const ModelConfig& c = config_;
    const int64_t hidden = c.hidden_size;
    const int64_t widest = std::max<int64_t>({hidden, c.q_dim(), c.intermediate_size});
    const size_t staging_bytes = std::max(kUploadStagingBytes, sizeof(T) * widest);
    PinnedMemory staging = make_pinned(staging_bytes);
    T* stage = reinterpret_cast<T*>(staging.get());
    const int64_t stage_elements = static_cast<int64_t>(staging_bytes / sizeof(T));

    // Converts rows to T into the staging buffer and copies them; row(i) is the fp32 source
    // of destination row i (rows of one device tensor may come from several host tensors).
    auto upload_rows = [&](T* dst, int64_t rows, int64_t cols, auto row) {
      const int64_t rows_per_chunk = std::max<int64_t>(1, stage_elements / cols);
      for (int64_t r0 = 0; r0 < rows; r0 += rows_per_chunk) {
        const int64_t count = std::min(rows_per_chunk, rows - r0);
        for (int64_t r = 0; r < count; ++r) {
          const float* src = row(r0 + r);
          T* out = stage + r * cols;
          for (int64_t i = 0; i < cols; ++i) out[i] = from_float<T>(src[i]);
        }
        CUDA_CHECK(cudaMemcpyAsync(dst + r0 * cols, stage,
                                   sizeof(T) * count * cols, cudaMemcpyHostToDevice,
                                   stream_.get()));
        CUDA_CHECK(cudaStreamSynchronize(stream_.get()));  // the staging buffer is refilled next
      }
    };
    auto upload_tensor = [&](T* dst, const TensorView& t) {
      const int64_t cols = t.shape.back();
      upload_rows(dst, t.numel() / cols, cols, [&](int64_t r) { return t.data + r * cols; });
    };
    auto upload_floats = [&](float* dst, const std::vector<float>& values) {
      if (dst == nullptr) return;  // no bias
      CUDA_CHECK(cudaMemcpy(dst, values.data(),
                            sizeof(float) * values.size(), cudaMemcpyHostToDevice));
    };

    upload_tensor(embed_, model.embed);
    if (!c.tie_word_embeddings) upload_tensor(lm_head_, model.lm_head);
    upload_floats(final_norm_, values_of(model.final_norm));
    upload_floats(inv_freq_, rope_inv_freq(c));
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerView& v = model.layers[l];
      const DeviceLayer<T>& d = layers_[l];
      upload_floats(d.attn_norm, values_of(v.attn_norm));
      upload_floats(d.ffn_norm, values_of(v.ffn_norm));

      const int64_t q_rows = v.q.weight.shape[0], kv_rows = v.k.weight.shape[0];
      upload_rows(d.qkv.weight, q_rows + 2 * kv_rows, hidden, [&](int64_t r) {
        if (r < q_rows) return v.q.weight.data + r * hidden;
        if (r < q_rows + kv_rows) return v.k.weight.data + (r - q_rows) * hidden;
        return v.v.weight.data + (r - q_rows - kv_rows) * hidden;
      });
      upload_floats(d.qkv.bias, stacked_bias({&v.q, &v.k, &v.v}));
      upload_tensor(d.o.weight, v.o.weight);
      upload_floats(d.o.bias, stacked_bias({&v.o}));
      upload_rows(d.gate_up.weight, 2 * c.intermediate_size, hidden, [&](int64_t r) {
        const TensorView& part = r % 2 == 0 ? v.gate.weight : v.up.weight;
        return part.data + (r / 2) * hidden;
      });
      upload_floats(d.gate_up.bias, interleaved_bias(v.gate, v.up));
      upload_tensor(d.down.weight, v.down.weight);
      upload_floats(d.down.bias, stacked_bias({&v.down}));
    }
  }

  // ---- passes ----

  const LayerPlan& plan(int layer) const {
    return pass_decode_ ? decode_plan_[layer] : prefill_plan_[layer];
  }
  const int32_t* pass_pos() const { return pass_input_; }
  const int32_t* pass_tokens() const { return pass_input_ + 1; }
  float* record_score() { return reinterpret_cast<float*>(step_out_ + out_layout_.score); }
  float* record_layer_score() {
    return reinterpret_cast<float*>(step_out_ + out_layout_.layer_score);
  }
  uint8_t* record_ffn_skipped() {
    return reinterpret_cast<uint8_t*>(step_out_ + out_layout_.ffn_skipped);
  }
  uint8_t* record_layer_skipped() {
    return reinterpret_cast<uint8_t*>(step_out_ + out_layout_.layer_skipped);
  }

  // Copies the pass's position and tokens to device memory, where the kernels (and a replayed
  // graph) read them.
  void upload_input(int pos, const int32_t* tokens, int n) {
    CUDA_CHECK(cudaEventSynchronize(input_copied_.get()));  // the last copy has left host_input_
    int32_t* host = reinterpret_cast<int32_t*>(host_input_.get());
    host[0] = pos;
    std::memcpy(host + 1, tokens, sizeof(int32_t) * n);
    CUDA_CHECK(cudaMemcpyAsync(pass_input_, host, sizeof(int32_t) * (n + 1),
                               cudaMemcpyHostToDevice, stream_.get()));
    CUDA_CHECK(cudaEventRecord(input_copied_.get(), stream_.get()));
  }

  // Embedding and layers of the uploaded tokens; no host synchronisation.
  void enqueue_pass(int n, bool decode, const LayerLoop& layers) {
    pass_tokens_ = n;
    pass_decode_ = decode;
    launch_embedding(embed_, pass_tokens(), n, config_.hidden_size, x_, stream_.get());
    layers();
  }

  void enqueue_logits(int row) {
    launch_logits_head(x_ + static_cast<int64_t>(row) * config_.hidden_size, config_.hidden_size,
                       final_norm_, config_.rms_norm_eps, lm_head_, config_.vocab_size, xn_,
                       reinterpret_cast<float*>(step_out_), stream_.get());
  }

  // Everything a decode step does on the device, in stream order (what the graph holds).
  void enqueue_decode_step(const LayerLoop& layers) {
    launch_begin_token(policy_.rule, state_, stream_.get());
    enqueue_pass(1, /*decode=*/true, layers);
    launch_end_token(state_, stream_.get());
    enqueue_logits(0);
  }

  void capture_decode_graph(const LayerLoop& layers) {
    cudaStream_t stream = stream_.get();
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      enqueue_decode_step(layers);
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream, &broken);  // leaves the stream usable
      Graph discard(broken);
      throw;
    }
    cudaGraph_t captured = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(stream, &captured));
    Graph graph(captured);
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph.get(), 0));
    decode_graph_.reset(exec);
  }

  void decode_step(int32_t token, int pos, const LayerLoop& layers, float* logits,
                   StepRecord& record) {
    upload_input(pos, &token, 1);
    // The graph never routes: a FiRST sequence that starts with a decode step runs it eagerly.
    pass_routes_ = routes_sequence(pos);
    if (use_graphs_ && !pass_routes_) {
      if (!decode_graph_) capture_decode_graph(layers);
      CUDA_CHECK(cudaGraphLaunch(decode_graph_.get(), stream_.get()));
    } else {
      enqueue_decode_step(layers);
    }
    pass_routes_ = false;
    CUDA_CHECK(cudaMemcpyAsync(host_output_.get(), step_out_, out_layout_.bytes,
                               cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));

    const char* out = host_output_.get();
    const size_t layers_count = static_cast<size_t>(config_.num_layers);
    std::memcpy(logits, out, sizeof(float) * config_.vocab_size);
    auto floats_at = [&](size_t offset) { return reinterpret_cast<const float*>(out + offset); };
    auto bytes_at = [&](size_t offset) { return reinterpret_cast<const uint8_t*>(out + offset); };
    record.score.assign(floats_at(out_layout_.score), floats_at(out_layout_.score) + layers_count);
    record.layer_score.assign(floats_at(out_layout_.layer_score),
                              floats_at(out_layout_.layer_score) + layers_count);
    record.ffn_skipped.assign(bytes_at(out_layout_.ffn_skipped),
                              bytes_at(out_layout_.ffn_skipped) + layers_count);
    record.layer_skipped.assign(bytes_at(out_layout_.layer_skipped),
                                bytes_at(out_layout_.layer_skipped) + layers_count);
  }

  // ---- blocks ----

  void run_ffn(int layer, FFNMode mode) {
    if (mode == FFNMode::Skip) return;
    const DeviceLayer<T>& w = layers_[layer];
    cudaStream_t stream = stream_.get();
    const int n = pass_tokens_;
    const int hidden = config_.hidden_size;
    const int32_t* skip_flag = routed_flag(layer);
    if (mode == FFNMode::Adaptive || mode == FFNMode::Random) {  // decode steps only: n == 1
      FfnGate gate;
      gate.rule = policy_.rule;
      gate.state = state_;
      gate.layer = layer;
      gate.random = mode == FFNMode::Random;
      gate.skip_flag = skip_flags_ + layer;
      gate.ffn_skipped = record_ffn_skipped();
      gate.score = record_score();
      launch_gated_rmsnorm(x_, hidden, w.ffn_norm, config_.rms_norm_eps, xn_, gate, stream);
      skip_flag = gate.skip_flag;
    } else {
      launch_rmsnorm(x_, n, hidden, w.ffn_norm, config_.rms_norm_eps, xn_, stream);
    }
    linear_swiglu(w.gate_up, xn_, n, act_, skip_flag);
    if (pass_decode_ && scores_) {  // the residual add moves into the score kernel
      linear(w.down, act_, n, ffn_out_, hidden, /*accumulate=*/false, skip_flag);
      launch_residual_add_score(x_, ffn_out_, hidden, state_, skip_flag, record_score() + layer,
                                stream);
    } else {
      residual_linear(w.down, act_, n, skip_flag);
    }
  }

  // ---- FiRST ----

  // The pass at `pos` routes the sequence: FiRST and the sequence's first pass.
  bool routes_sequence(int pos) const { return policy_.rule.kind == PolicyKind::FiRST && pos == 0; }

  // The device flag of a routed layer, or null.
  const int32_t* routed_flag(int layer) const {
    return plan(layer).routed ? layer_off_ + layer : nullptr;
  }

  // Decides `layer` for the sequence from the input norm of the pass's n tokens in xn_.
  void route(int layer, int n) {
    RouteArgs<T> r;
    r.xn = xn_;
    r.n = std::min(n, kRouterPromptTokens);
    r.hidden = config_.hidden_size;
    r.weight = router_weight_ + static_cast<int64_t>(layer) * config_.hidden_size;
    r.bias = router_bias_ + layer;
    r.threshold_logit = threshold_logit_;
    r.layer_off = layer_off_ + layer;
    r.gate = router_gate_ + layer;
    r.ffn_skipped = record_ffn_skipped() + layer;
    r.layer_skipped = record_layer_skipped() + layer;
    launch_route_layer(r, stream_.get());
  }

  // Every layer runs until a FiRST pass routes the sequence; the step record's flags of a
  // routed sequence start clear.
  void run_every_layer() {
    const size_t layers = static_cast<size_t>(config_.num_layers);
    CUDA_CHECK(cudaMemsetAsync(layer_off_, 0, sizeof(int32_t) * layers, stream_.get()));
    const std::vector<float> nans(layers, std::numeric_limits<float>::quiet_NaN());
    CUDA_CHECK(cudaMemcpyAsync(router_gate_, nans.data(), sizeof(float) * layers,
                               cudaMemcpyHostToDevice, stream_.get()));
    if (policy_.rule.kind == PolicyKind::FiRST) {  // no flag or score of the last sequence
      CUDA_CHECK(cudaMemsetAsync(record_ffn_skipped(), 0, layers, stream_.get()));
      CUDA_CHECK(cudaMemsetAsync(record_layer_skipped(), 0, layers, stream_.get()));
      for (float* scores : {record_score(), record_layer_score()}) {
        CUDA_CHECK(cudaMemcpyAsync(scores, nans.data(), sizeof(float) * layers,
                                   cudaMemcpyHostToDevice, stream_.get()));
      }
    }
  }

  // x += x_pass W^T + b. A routed layer's prefill linear (cuBLAS, which cannot read the flag)
  // writes a delta that a gated kernel adds; one-token linears read the flag themselves.
  void residual_linear(const DeviceLinear<T>& w, const T* x_pass, int n,
                       const int32_t* skip_flag) {
    const int hidden = config_.hidden_size;
    if (skip_flag == nullptr || use_gemv(n, skip_flag)) {
      linear(w, x_pass, n, x_, hidden, /*accumulate=*/true, skip_flag);
      return;
    }
    linear(w, x_pass, n, residual_delta_, hidden, /*accumulate=*/false, nullptr);
    launch_gated_residual_add(x_, residual_delta_, static_cast<int64_t>(n) * hidden, skip_flag,
                              stream_.get());
  }

  // One-token linears run the GEMV, the only one that can read a skip flag (flags exist only
  // in decode steps); FFNSKIP_DECODE_GEMV=cublas moves the ungated ones to cuBLAS, for
  // comparison. Multi-token linears run cuBLAS.
  bool use_gemv(int n, const int32_t* skip_flag) const {
    return n == 1 && (skip_flag != nullptr || !cublas_decode_);
  }

  GemvArgs<T> gemv_args(const DeviceLinear<T>& w, const T* x, const int32_t* skip_flag) const {
    GemvArgs<T> g;
    g.weight = w.weight;
    g.bias = w.bias;
    g.rows = w.rows;
    g.cols = w.cols;
    g.x = x;
    g.skip_flag = skip_flag;
    return g;
  }

  GemmArgs<T> gemm_args(const DeviceLinear<T>& w, const T* x, int n, float* y, int y_stride,
                        bool accumulate) const {
    GemmArgs<T> g;
    g.weight = w.weight;
    g.bias = w.bias;
    g.rows = w.rows;
    g.cols = w.cols;
    g.x = x;
    g.n = n;
    g.y = y;
    g.y_stride = y_stride;
    g.accumulate = accumulate;
    return g;
  }

  // y[t, :] (row stride y_stride) = x[t, :] W^T + b, or += with accumulate.
  void linear(const DeviceLinear<T>& w, const T* x, int n, float* y, int y_stride,
              bool accumulate, const int32_t* skip_flag) {
    if (use_gemv(n, skip_flag)) {
      GemvArgs<T> g = gemv_args(w, x, skip_flag);
      g.y = y;
      launch_gemv(g, accumulate ? GemvOutput::Accumulate : GemvOutput::Store, stream_.get());
      return;
    }
    gemm(cublas_.get(), stream_.get(), gemm_args(w, x, n, y, y_stride, accumulate));
  }

  // act[t, :] = SwiGLU of the interleaved gate/up projection of x[t, :].
  void linear_swiglu(const DeviceLinear<T>& w, const T* x, int n, T* act,
                     const int32_t* skip_flag) {
    if (use_gemv(n, skip_flag)) {
      GemvArgs<T> g = gemv_args(w, x, skip_flag);
      g.act = act;
      launch_gemv(g, GemvOutput::SwiGLU, stream_.get());
      return;
    }
    gemm(cublas_.get(), stream_.get(), gemm_args(w, x, n, gate_up_, w.rows, false));
    launch_swiglu(gate_up_, n, w.rows / 2, act, stream_.get());
  }

  // ---- state ----

  ModelConfig config_;
  int max_seq_len_;
  int chunk_tokens_;
  StepOutputLayout out_layout_;
  bool use_graphs_;     // FFNSKIP_CUDA_GRAPHS=0 runs decode steps eagerly (for comparison)
  bool cublas_decode_;  // FFNSKIP_DECODE_GEMV=cublas
  int device_ = 0;
  int num_splits_ = 1;

  // Declaration order is destruction order reversed: the graph, events and handle go before
  // the memory, the memory before the stream.
  Stream stream_;
  DeviceMemory arena_;
  CublasHandle cublas_;
  PinnedMemory host_input_;   // [pos, tokens...] of the next pass
  PinnedMemory host_output_;  // the step output, laid out as out_layout_
  Event input_copied_;
  GraphExec decode_graph_;

  // Device pieces of arena_.
  T* embed_ = nullptr;
  T* lm_head_ = nullptr;
  float* final_norm_ = nullptr;
  float* inv_freq_ = nullptr;
  std::vector<DeviceLayer<T>> layers_;
  T* k_cache_ = nullptr;  // [layers, max_seq_len, kv_dim]
  T* v_cache_ = nullptr;
  float* x_ = nullptr;  // residual stream [chunk, hidden]
  T* xn_ = nullptr;     // normed rows, input of the linears
  float* qkv_ = nullptr;
  T* attn_ = nullptr;
  float* gate_up_ = nullptr;  // prefill: interleaved gate/up projection
  T* act_ = nullptr;
  float* ffn_out_ = nullptr;      // decode with scores: the FFN output before its residual add
  float* layer_input_ = nullptr;  // decode with compute_scores: x_l
  float* attention_partial_ = nullptr;
  int32_t* pass_input_ = nullptr;  // [pos, tokens...]
  SkipState* state_ = nullptr;
  int32_t* skip_flags_ = nullptr;  // per layer: this step skips the FFN
  float* residual_delta_ = nullptr;  // [chunk, hidden]: a routed layer's prefill output
  float* router_weight_ = nullptr;   // FiRST: [layers, hidden]
  float* router_bias_ = nullptr;     // FiRST: [layers]
  int32_t* layer_off_ = nullptr;     // FiRST: per layer, 1 when this sequence skips it
  float* router_gate_ = nullptr;     // FiRST: per layer, the gate (NaN until routed)
  size_t kv_cache_bytes_ = 0;
  char* step_out_ = nullptr;       // logits, then the step record (out_layout_)
  char* cublas_workspace_ = nullptr;

  // Policy and the current pass.
  SkipPolicy policy_;
  bool compute_scores_ = false;
  bool scores_ = false;  // decode steps compute the FFN score (FFN-SkipLLM or compute_scores)
  std::vector<LayerPlan> prefill_plan_, decode_plan_;
  float threshold_logit_ = 0.0f;  // FiRST
  int pass_tokens_ = 0;
  bool pass_decode_ = false;
  bool pass_routes_ = false;  // this pass starts a FiRST sequence and routes its layers
};

}  // namespace

}  // namespace ffnskip::cuda

extern "C" {

const char* ffnskip_cuda_interface() { return FFNSKIP_CUDA_INTERFACE; }

void ffnskip_cuda_query(ffnskip::CudaRuntimeQuery* out) {
  *out = ffnskip::CudaRuntimeQuery{};
  cudaRuntimeGetVersion(&out->runtime_version);
  cudaDriverGetVersion(&out->driver_version);
  int major = 0, minor = 0, patch = 0;
  if (cublasGetProperty(MAJOR_VERSION, &major) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(MINOR_VERSION, &minor) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(PATCH_LEVEL, &patch) == CUBLAS_STATUS_SUCCESS) {
    out->cublas_version = major * 10000 + minor * 100 + patch;
  }
  try {
    ffnskip::cuda::require_device();
    int device = 0;
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    CUDA_CHECK(cudaGetDeviceCount(&out->device_count));
    std::snprintf(out->device_name, sizeof(out->device_name), "%s", prop.name);
  } catch (const std::exception& e) {
    out->device_count = 0;
    std::snprintf(out->error, sizeof(out->error), "%s", e.what());
  }
}

ffnskip::Backend* ffnskip_cuda_create_backend(const ffnskip::ModelConfig* config,
                                              const ffnskip::ModelView* model, int max_seq_len,
                                              ffnskip::DType dtype) {
  using namespace ffnskip::cuda;
  require_device();
  switch (dtype) {
    case ffnskip::DType::F32:
      return new CudaBackend<float>(*config, *model, max_seq_len);
    case ffnskip::DType::F16:
      return new CudaBackend<__half>(*config, *model, max_seq_len);
    case ffnskip::DType::BF16:
      return new CudaBackend<__nv_bfloat16>(*config, *model, max_seq_len);
  }
  throw std::invalid_argument("unknown dtype");
}

double ffnskip_cuda_copy_bandwidth(size_t bytes, int iterations) {
  using namespace ffnskip::cuda;
  require_device();
  void* src = nullptr;
  void* dst = nullptr;
  CUDA_CHECK(cudaMalloc(&src, bytes));
  DeviceMemory src_owner(static_cast<char*>(src));
  CUDA_CHECK(cudaMalloc(&dst, bytes));
  DeviceMemory dst_owner(static_cast<char*>(dst));
  CUDA_CHECK(cudaMemset(src, 1, bytes));
  Stream stream = make_stream();
  cudaEvent_t start_event = nullptr, stop_event = nullptr;
  CUDA_CHECK(cudaEventCreate(&start_event));
  Event start(start_event);
  CUDA_CHECK(cudaEventCreate(&stop_event));
  Event stop(stop_event);
  std::vector<float> ms;
  for (int i = -1; i < std::max(1, iterations); ++i) {  // i = -1: warm-up
    CUDA_CHECK(cudaEventRecord(start.get(), stream.get()));
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream.get()));
    CUDA_CHECK(cudaEventRecord(stop.get(), stream.get()));
    CUDA_CHECK(cudaEventSynchronize(stop.get()));
    float elapsed = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&elapsed, start.get(), stop.get()));
    if (i >= 0) ms.push_back(elapsed);
  }
  std::sort(ms.begin(), ms.end());
  return 2.0 * static_cast<double>(bytes) / (ms[ms.size() / 2] * 1e-3);
}

}  // extern "C"
