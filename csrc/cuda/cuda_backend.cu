// The CUDA backend: weights in fp32, fp16 or bf16, or (dtype "auto") in the GGUF block formats
// the kernels read in place (device_model.cuh), fp32 residual stream and accumulation, cuBLAS
// for prefill linears (block formats dequantised a tile at a time), GEMV kernels for decode
// linears, and every decode step replayed from one CUDA graph captured on the first step after
// each plan change.
//
// What a decode step depends on that changes from token to token lives in device memory: the
// pass input (position, decode index, tokens: one async copy from pinned memory before the
// launch) and the skip state (updated by the rule's kernels inside the graph). So the
// sub-blocks read no host value of a Pass beyond its shape (kind, n, routes), and a captured
// step serves every later one. The per-layer FFN decisions of the adaptive and random policies
// are made on the device by the FFN's RMSNorm kernel, which writes a flag; the FFN's other
// kernels read the flag first and return at once when it is set, so a skipped FFN reads none of
// its weights (ffn_gate.cuh). The logits and the step record come back with one copy and one
// sync. FiRST routes a sequence on the device in the pass that starts it, and the routed
// layers' kernels read the per-layer flag the router writes (router.cuh).
#include "cuda_backend.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/skip_rule.h"
#include "common.cuh"
#include "cuda_check.cuh"
#include "decode_attention.cuh"
#include "device.cuh"
#include "device_model.cuh"
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
// The pass input in device memory: position, decode index, then the tokens.
constexpr int kPassInputHeader = 2;

// The step output, contiguous so that one copy brings it back: the logits, the record, and
// FiRST's per-layer flags of the sequence.
struct StepOutputLayout {
  size_t score = 0, layer_score = 0, ffn_skipped = 0, layer_skipped = 0, routed_off = 0,
         bytes = 0;

  StepOutputLayout(int vocab, int layers) {
    const size_t floats = sizeof(float);
    score = floats * vocab;  // logits at offset 0
    layer_score = score + floats * layers;
    ffn_skipped = layer_score + floats * layers;
    layer_skipped = ffn_skipped + layers;
    routed_off = (layer_skipped + layers + 3) / 4 * 4;  // int32 flags, aligned
    bytes = routed_off + sizeof(int32_t) * layers;
  }
};

template <typename T>
class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& config, const ModelView& model, int max_seq_len,
              DType requested)
      : config_(config),
        requested_(requested),
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

    host_input_ = make_pinned(sizeof(int32_t) * (chunk_tokens_ + kPassInputHeader));
    host_output_ = make_pinned(out_layout_.bytes);
    input_copied_ = make_event();

    model_.upload(config_, model, stream_.get());
    const SkipState fresh;
    CUDA_CHECK(cudaMemcpyAsync(state_, &fresh, sizeof(fresh), cudaMemcpyHostToDevice,
                               stream_.get()));
    reset_routing();
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  }

  ~CudaBackend() override {
    if (stream_) cudaStreamSynchronize(stream_.get());  // nothing in flight when memory goes
  }

  void set_plan(const ExecutionPlan& plan) override { install_plan(plan, false); }
  void set_draft_plan(const ExecutionPlan& plan) override { install_plan(plan, true); }

  void run(const Pass& pass) override {
    DeviceGuard guard(device_);
    if (is_step(pass.kind)) {
      decode_step(pass);
      return;
    }
    // Prefill in chunks (a verify pass is one: kMaxVerifyTokens < the chunk); FiRST routes on
    // the first, the last gives the logits.
    const ExecutionPlan& plan = plans_.of(pass.kind);
    for_each_chunk(pass, chunk_tokens_, [&](Pass& chunk, int done) {
      chunk.logits = done + chunk.n == pass.n ? pass.logits : nullptr;
      upload_input(chunk);
      forward(*this, chunk, plan);
    });
    if (pass.kind == PassKind::Verify) {  // every row, straight into the caller's array
      CUDA_CHECK(cudaMemcpyAsync(pass.logits, verify_logits_,
                                 sizeof(float) * config_.vocab_size * pass.n,
                                 cudaMemcpyDeviceToHost, stream_.get()));
      CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
      return;
    }
    CUDA_CHECK(cudaMemcpyAsync(host_output_.get(), step_out_,
                               sizeof(float) * config_.vocab_size, cudaMemcpyDeviceToHost,
                               stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    std::memcpy(pass.logits, host_output_.get(), sizeof(float) * config_.vocab_size);
  }
  // Every layer runs until a FiRST pass routes the sequence.
  void reset_routing() override {
    DeviceGuard guard(device_);
    const size_t layers = static_cast<size_t>(config_.num_layers);
    CUDA_CHECK(cudaMemsetAsync(routed_off(), 0, sizeof(int32_t) * layers, stream_.get()));
    const std::vector<float> nans(layers, std::numeric_limits<float>::quiet_NaN());
    CUDA_CHECK(cudaMemcpyAsync(router_gate_, nans.data(), sizeof(float) * layers,
                               cudaMemcpyHostToDevice, stream_.get()));
    routed_off_on_host_.assign(layers, 0);
  }

  void sequence_layers(std::vector<uint8_t>& active, std::vector<float>& gate) const override {
    DeviceGuard guard(device_);
    const size_t layers = static_cast<size_t>(config_.num_layers);
    std::vector<int32_t> off(layers);
    gate.resize(layers);
    CUDA_CHECK(cudaMemcpyAsync(off.data(), step_out_ + out_layout_.routed_off,
                               sizeof(int32_t) * layers, cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaMemcpyAsync(gate.data(), router_gate_, sizeof(float) * layers,
                               cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    active.resize(layers);
    for (size_t l = 0; l < layers; ++l) active[l] = off[l] != 0 ? 0 : 1;
  }

  // The cache is one fixed allocation (captured graphs hold its addresses): FiRST's skipped
  // layers neither write nor read theirs, but it stays allocated.
  int64_t kv_cache_bytes() const override { return static_cast<int64_t>(kv_cache_bytes_); }

  // The bytes as held: block formats at their own size.
  WeightFootprint weight_footprint() const override {
    WeightFootprint f;
    std::map<TensorType, int64_t> by_type;
    by_type[model_.embed.type] += model_.embed.bytes();
    if (!config_.tie_word_embeddings) by_type[model_.lm_head.type] += model_.lm_head.bytes();
    const int q_rows = config_.q_dim();
    for (const DeviceLayer& layer : model_.layers) {
      for (const DeviceLinear* linear : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) {
        for (int i = 0; i < linear->num_segments; ++i) {
          by_type[linear->segments[i].type] += linear->segments[i].bytes();
        }
      }
      f.layers.push_back({layer.qkv.bytes(0, q_rows), layer.qkv.bytes(q_rows, layer.qkv.rows),
                          layer.o.bytes(), layer.gate_up.bytes() + layer.down.bytes()});
    }
    f.bytes_by_type.assign(by_type.begin(), by_type.end());
    f.head = model_.lm_head.bytes();
    return f;
  }

  int decode_step_kernels() const override { return decode_graph_kernels_; }

  TensorType held_type(TensorType stored) const override {
    return DeviceModel<T>::held_type(stored, requested_);
  }

  // ---- the sub-blocks of a pass, in the order forward() (plan.h) calls them ----

  void begin_pass(const Pass& pass) {
    TokenStart start;
    if (is_step(pass.kind)) {
      start.rule = plans_.of(pass.kind).rule;
      start.state = state_;
      start.decode_index = pass_decode_index();
    }
    launch_embedding<T>(model_.embed.data, model_.embed.type, pass_tokens(), pass.n,
                        config_.hidden_size, x_, start, stream_.get());
  }

  // x += Attn(RMSNorm(x)) writing K/V, or only the K/V (early exit), or nothing.
  void attention_block(const Pass& pass, int layer, const LayerPlan& plan) {
    if (plan.attention == AttentionMode::Skip) return;
    if (pass.routes) route(layer, pass.n);  // for this plan or the draft's (which then runs it)
    if (skips_on_host(pass, layer, plan)) return;
    const DeviceLayer& w = model_.layers[layer];
    const int n = pass.n;
    const int hidden = config_.hidden_size;
    const int q_dim = config_.q_dim();
    const int kv_dim = config_.kv_dim();
    const int qkv_dim = q_dim + 2 * kv_dim;
    const bool decode = is_step(pass.kind);
    cudaStream_t stream = stream_.get();
    if (plan.layer_score) {  // x_l, for the layer score
      CUDA_CHECK(cudaMemcpyAsync(layer_input_, x_, sizeof(float) * hidden,
                                 cudaMemcpyDeviceToDevice, stream));
    }
    const int32_t* layer_off = routed_flag(pass, layer, plan);
    const bool kv_only = plan.attention == AttentionMode::KVOnly;  // early exit: K/V rows only
    const DeviceLinear qkv = kv_only ? w.qkv.rows_from(q_dim) : w.qkv;
    T* k_cache = k_cache_ + static_cast<int64_t>(layer) * max_seq_len_ * kv_dim;
    T* v_cache = v_cache_ + static_cast<int64_t>(layer) * max_seq_len_ * kv_dim;
    project_qkv(qkv, normed_input(qkv, w.attn_norm, n, layer_off), n, kv_only, layer_off,
                k_cache, v_cache);
    if (kv_only) return;
    if (decode) {
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

  // x += FFN(RMSNorm(x)), unless the plan, the rule (on the device) or the routing skips it.
  void ffn_block(const Pass& pass, int layer, const LayerPlan& plan) {
    const bool runs = plan.ffn != FFNMode::Skip && !skips_on_host(pass, layer, plan);
    if (runs) run_ffn(pass, layer, plan);
    if (plan.layer_score) {
      launch_cosine(layer_input_, x_, config_.hidden_size, routed_flag(pass, layer, plan),
                    record_layer_score() + layer, stream_.get());
    }
  }

  // The logits of the pass's last token, into the step output (when the pass wants them); of
  // every token of a verify pass, into verify_logits_ (one GEMM over the LM head).
  void end_pass(const Pass& pass) {
    if (pass.logits == nullptr) return;
    if (pass.kind == PassKind::Verify) {
      launch_rmsnorm(x_, pass.n, config_.hidden_size, model_.final_norm, config_.rms_norm_eps,
                     xn_, stream_.get());
      DeviceLinear head;
      head.segments[0] = model_.lm_head;
      head.num_segments = 1;
      head.rows = config_.vocab_size;
      head.cols = config_.hidden_size;
      linear(head, xn_, pass.n, verify_logits_, config_.vocab_size, false, nullptr);
      return;
    }
    const int64_t row = pass.n - 1;
    launch_logits_head(x_ + row * config_.hidden_size, config_.hidden_size, model_.final_norm,
                       config_.rms_norm_eps, model_.lm_head.data, model_.lm_head.type,
                       config_.vocab_size, xn_, reinterpret_cast<float*>(step_out_),
                       stream_.get());
  }

 private:
  // ---- setup ----

  // The policy's plan (slot 0) or the draft's (1); its decode graph is captured again, for
  // this plan, at its next step.
  void install_plan(const ExecutionPlan& plan, bool draft) {
    DeviceGuard guard(device_);
    upload_routers(plan);
    (draft ? plans_.draft : plans_.target) = plan;
    record_head_[draft ? 1 : 0] = record_head(plan);
    record_head_on_device_ = -1;
    (draft ? draft_graph_ : decode_graph_).reset();
    if (!draft) decode_graph_kernels_ = 0;
  }

  // Takes every device piece from `arena`: weights, then the KV cache, then the buffers.
  void carve(Arena& arena, const ModelView& model, ArenaSizes& sizes) {
    const ModelConfig& c = config_;
    const int hidden = c.hidden_size;
    const int q_dim = c.q_dim(), kv_dim = c.kv_dim(), inter = c.intermediate_size;
    model_.carve(arena, c, model, requested_);
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
    pass_input_ = arena.take<int32_t>(tokens + kPassInputHeader);
    state_ = arena.take<SkipState>(1);
    skip_flags_ = arena.take<int32_t>(c.num_layers);
    router_weight_ = arena.take<float>(static_cast<size_t>(c.num_layers) * hidden);
    router_bias_ = arena.take<float>(c.num_layers);
    router_gate_ = arena.take<float>(c.num_layers);
    step_out_ = arena.take<char>(out_layout_.bytes);
    verify_logits_ = arena.take<float>(static_cast<size_t>(kMaxVerifyTokens) * c.vocab_size);
    cublas_workspace_ = arena.take<char>(kCublasWorkspaceBytes);
    gemm_scratch_elements_ = model_.gemm_scratch_elements(c.hidden_size);
    gemm_scratch_ = arena.take<T>(static_cast<size_t>(gemm_scratch_elements_));
    sizes.buffers = arena.size() - sizes.weights - sizes.kv_cache;
  }

  // ---- passes ----

  const int32_t* pass_pos() const { return pass_input_; }
  const int32_t* pass_decode_index() const { return pass_input_ + 1; }
  const int32_t* pass_tokens() const { return pass_input_ + kPassInputHeader; }
  float* record_score() { return reinterpret_cast<float*>(step_out_ + out_layout_.score); }
  float* record_layer_score() {
    return reinterpret_cast<float*>(step_out_ + out_layout_.layer_score);
  }
  uint8_t* record_ffn_skipped() {
    return reinterpret_cast<uint8_t*>(step_out_ + out_layout_.ffn_skipped);
  }
  // FiRST: per layer, 1 when this sequence skips it (the skip flag its kernels read).
  int32_t* routed_off() const {
    return reinterpret_cast<int32_t*>(step_out_ + out_layout_.routed_off);
  }

  // Copies the pass's position, decode index and tokens to device memory, where the kernels
  // (and a replayed graph) read them.
  void upload_input(const Pass& pass) {
    CUDA_CHECK(cudaEventSynchronize(input_copied_.get()));  // the last copy has left host_input_
    int32_t* host = reinterpret_cast<int32_t*>(host_input_.get());
    host[0] = pass.pos;
    host[1] = static_cast<int32_t>(pass.decode_index);  // < pass.pos + 1 <= max_seq_len
    std::memcpy(host + kPassInputHeader, pass.tokens, sizeof(int32_t) * pass.n);
    CUDA_CHECK(cudaMemcpyAsync(pass_input_, host, sizeof(int32_t) * (pass.n + kPassInputHeader),
                               cudaMemcpyHostToDevice, stream_.get()));
    CUDA_CHECK(cudaEventRecord(input_copied_.get(), stream_.get()));
  }

  // FiRST's routers, from the plan that routes sequences (at most one of the pair does).
  void upload_routers(const ExecutionPlan& plan) {
    if (!plan.routes_sequences()) return;
    CUDA_CHECK(cudaMemcpyAsync(router_weight_, plan.router_weight.data(),
                               sizeof(float) * plan.router_weight.size(), cudaMemcpyHostToDevice,
                               stream_.get()));
    CUDA_CHECK(cudaMemcpyAsync(router_bias_, plan.router_bias.data(),
                               sizeof(float) * plan.router_bias.size(), cudaMemcpyHostToDevice,
                               stream_.get()));
  }

  // The parts of the step record the graph does not write every step: the plan's own flags and
  // NaN scores. Decided FFNs and computed scores are rewritten at every step.
  std::vector<char> record_head(const ExecutionPlan& plan) const {
    const StepRecord& record = plan.decode_record;
    const size_t layers = record.score.size();
    std::vector<char> head(out_layout_.routed_off - out_layout_.score, 0);
    std::memcpy(head.data(), record.score.data(), sizeof(float) * layers);
    std::memcpy(head.data() + out_layout_.layer_score - out_layout_.score,
                record.layer_score.data(), sizeof(float) * layers);
    std::memcpy(head.data() + out_layout_.ffn_skipped - out_layout_.score,
                record.ffn_skipped.data(), layers);
    std::memcpy(head.data() + out_layout_.layer_skipped - out_layout_.score,
                record.layer_skipped.data(), layers);
    return head;
  }

  // Before a step of the policy (slot 0) or the draft (1): that plan's record head in the step
  // output, copied only when the other plan's step ran last (a few hundred bytes).
  void use_record_head(int slot) {
    if (record_head_on_device_ == slot) return;
    const std::vector<char>& head = record_head_[slot];
    // From pageable memory: the call returns once the source has been staged.
    CUDA_CHECK(cudaMemcpyAsync(step_out_ + out_layout_.score, head.data(), head.size(),
                               cudaMemcpyHostToDevice, stream_.get()));
    record_head_on_device_ = slot;
  }

  // Kernel nodes of a captured graph (cuBLAS's included; copies and memsets are not kernels).
  static int kernel_nodes(cudaGraph_t graph) {
    size_t count = 0;
    CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
    std::vector<cudaGraphNode_t> nodes(count);
    CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
    int kernels = 0;
    for (cudaGraphNode_t node : nodes) {
      cudaGraphNodeType type{};
      CUDA_CHECK(cudaGraphNodeGetType(node, &type));
      if (type == cudaGraphNodeTypeKernel) ++kernels;
    }
    return kernels;
  }

  void capture_decode_graph(const Pass& pass, GraphExec& graph_out) {
    cudaStream_t stream = stream_.get();
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      forward(*this, pass, plans_.of(pass.kind));
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream, &broken);  // leaves the stream usable
      Graph discard(broken);
      throw;
    }
    cudaGraph_t captured = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(stream, &captured));
    Graph graph(captured);
    if (pass.kind != PassKind::Draft) decode_graph_kernels_ = kernel_nodes(graph.get());
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph.get(), 0));
    graph_out.reset(exec);
  }

  void decode_step(const Pass& pass) {
    if (pass.n != 1) throw std::logic_error("CUDA backend: a decode step has exactly one token");
    const bool draft = pass.kind == PassKind::Draft;
    const ExecutionPlan& plan = plans_.of(pass.kind);
    use_record_head(draft ? 1 : 0);
    upload_input(pass);
    // The graph never routes: a FiRST sequence that starts with a decode step runs it eagerly.
    GraphExec& graph = draft ? draft_graph_ : decode_graph_;
    if (use_graphs_ && !pass.routes) {
      if (!graph) capture_decode_graph(pass, graph);
      CUDA_CHECK(cudaGraphLaunch(graph.get(), stream_.get()));
    } else {
      forward(*this, pass, plan);
    }
    CUDA_CHECK(cudaMemcpyAsync(host_output_.get(), step_out_, out_layout_.bytes,
                               cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));

    const char* out = host_output_.get();
    const size_t layers = static_cast<size_t>(config_.num_layers);
    std::memcpy(pass.logits, out, sizeof(float) * config_.vocab_size);
    StepRecord& record = *pass.record;
    auto floats_at = [&](size_t offset) { return reinterpret_cast<const float*>(out + offset); };
    auto bytes_at = [&](size_t offset) { return reinterpret_cast<const uint8_t*>(out + offset); };
    record.score.assign(floats_at(out_layout_.score), floats_at(out_layout_.score) + layers);
    record.layer_score.assign(floats_at(out_layout_.layer_score),
                              floats_at(out_layout_.layer_score) + layers);
    record.ffn_skipped.assign(bytes_at(out_layout_.ffn_skipped),
                              bytes_at(out_layout_.ffn_skipped) + layers);
    record.layer_skipped.assign(bytes_at(out_layout_.layer_skipped),
                                bytes_at(out_layout_.layer_skipped) + layers);
    const auto* off = reinterpret_cast<const int32_t*>(out + out_layout_.routed_off);
    for (size_t l = 0; l < layers; ++l) {  // a routed-off layer runs neither sub-block
      if (plan.decode[l].routed && off[l] != 0) {
        record.ffn_skipped[l] = 1;
        record.layer_skipped[l] = 1;
      }
    }
  }

  void run_ffn(const Pass& pass, int layer, const LayerPlan& plan) {
    const DeviceLayer& w = model_.layers[layer];
    cudaStream_t stream = stream_.get();
    const int n = pass.n;
    const int hidden = config_.hidden_size;
    const int32_t* skip_flag = routed_flag(pass, layer, plan);
    if (plan.ffn == FFNMode::Adaptive || plan.ffn == FFNMode::Random) {  // decode: n == 1
      FfnGate gate;
      gate.rule = plans_.of(pass.kind).rule;
      gate.mode = plan.ffn;
      gate.state = state_;
      gate.decode_index = pass_decode_index();
      gate.layer = layer;
      gate.skip_flag = skip_flags_ + layer;
      gate.ffn_skipped = record_ffn_skipped();
      gate.score = record_score();
      launch_gated_rmsnorm(x_, hidden, w.ffn_norm, config_.rms_norm_eps, xn_, gate, stream);
      skip_flag = gate.skip_flag;
      linear_swiglu(w.gate_up, xn_, n, act_, skip_flag);
    } else {
      linear_swiglu(w.gate_up, normed_input(w.gate_up, w.ffn_norm, n, skip_flag), n, act_,
                    skip_flag);
    }
    if (plan.ffn_score) {  // decode: the residual add moves into the score kernel
      linear(w.down, act_, n, ffn_out_, hidden, /*accumulate=*/false, skip_flag);
      launch_residual_add_score(x_, ffn_out_, hidden, state_, skip_flag, record_score() + layer,
                                stream);
    } else {
      residual_linear(w.down, act_, n, skip_flag);
    }
  }

  // ---- FiRST ----

  // A decode step's kernels read a routed layer's flag on the device (the captured graph runs
  // for every sequence); multi-token passes know it on the host and launch nothing for a layer
  // routed off, so prefill neither reads its weights nor its unwritten K/V.
  const int32_t* routed_flag(const Pass& pass, int layer, const LayerPlan& plan) const {
    return plan.routed && is_step(pass.kind) ? routed_off() + layer : nullptr;
  }
  bool skips_on_host(const Pass& pass, int layer, const LayerPlan& plan) const {
    return plan.routed && !is_step(pass.kind) && routed_off_on_host_[layer] != 0;
  }

  // Decides `layer` for the sequence from the input norm of the pass's first tokens (fp32).
  void route(int layer, int n) {
    RouteArgs r;
    r.x = x_;
    r.norm_weight = model_.layers[layer].attn_norm;
    r.eps = config_.rms_norm_eps;
    r.n = std::min(n, kRouterPromptTokens);
    r.hidden = config_.hidden_size;
    r.weight = router_weight_ + static_cast<int64_t>(layer) * config_.hidden_size;
    r.bias = router_bias_ + layer;
    r.threshold_logit = plans_.routing().threshold_logit;
    r.layer_off = routed_off() + layer;
    r.gate = router_gate_ + layer;
    launch_route_layer(r, stream_.get());
    // One sync per layer of the routing pass (the next layer's launches depend on it).
    auto* flag = reinterpret_cast<int32_t*>(host_output_.get() + out_layout_.routed_off) + layer;
    CUDA_CHECK(cudaMemcpyAsync(flag, r.layer_off, sizeof(int32_t), cudaMemcpyDeviceToHost,
                               stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    routed_off_on_host_[layer] = *flag != 0 ? 1 : 0;
  }

  // x += x_pass W^T + b.
  void residual_linear(const DeviceLinear& w, const T* x_pass, int n, const int32_t* skip_flag) {
    linear(w, x_pass, n, x_, config_.hidden_size, /*accumulate=*/true, skip_flag);
  }

  // The input of a linear: rows in T, or for one token on GEMVs the RMSNorm of the residual
  // stream, which each GEMV computes in its prologue.
  struct LinearInput {
    LinearInput(const T* rows) : x(rows) {}  // NOLINT(google-explicit-constructor): plain rows
    LinearInput(const T* rows, const float* norm) : x(rows), norm_weight(norm) {}
    const T* x;
    const float* norm_weight = nullptr;  // non-null: the GEMVs norm x_ with it
  };

  // RMSNorm(x_) with `weight` as the input of `w`: folded into the GEMVs when one token runs on
  // GEMVs only (a launch fewer, the same values), else written to xn_ by the norm kernel.
  LinearInput normed_input(const DeviceLinear& w, const float* weight, int n,
                           const int32_t* skip_flag) {
    if (runs_on_gemvs(w, n, skip_flag) && gemv_folds_norm<T>(w.cols)) return {xn_, weight};
    launch_rmsnorm(x_, n, config_.hidden_size, weight, config_.rms_norm_eps, xn_, stream_.get());
    return {xn_};
  }

  // The [q; k; v] rows of the pass's tokens (from q_dim on when kv_only: early exit): q rotated
  // into qkv_, k rotated and v into the layer's cache rows at the pass's positions. For one
  // token in the GEMVs' epilogue (a launch fewer, the same values), else the RoPE kernel after.
  void project_qkv(const DeviceLinear& qkv, const LinearInput& input, int n, bool kv_only,
                   const int32_t* layer_off, T* k_cache, T* v_cache) {
    RopeKvLayout layout;
    layout.q_dim = config_.q_dim();
    layout.kv_dim = config_.kv_dim();
    layout.head_dim = config_.head_dim;
    layout.pos = pass_pos();
    layout.inv_freq = model_.inv_freq;
    layout.interleaved = config_.rope_interleaved;
    const int first_row = kv_only ? layout.q_dim : 0;
    if (runs_on_gemvs(qkv, n, layer_off)) {
      for (int i = 0; i < qkv.num_segments; ++i) {
        const WeightSegment& segment = qkv.segments[i];
        GemvArgs<T> g = gemv_args(qkv, segment, input, layer_off);
        g.y = qkv_ + first_row + segment.first_row;
        g.first_row = first_row + segment.first_row;
        g.rope = layout;
        g.k_cache = k_cache;
        g.v_cache = v_cache;
        launch_gemv(g, GemvOutput::RopeKv, stream_.get());
      }
      return;
    }
    linear(qkv, input, n, qkv_ + first_row, layout.stack(), /*accumulate=*/false, layer_off);
    RopeKvArgs rope;
    rope.qkv = qkv_;
    rope.n = n;
    rope.q_heads = kv_only ? 0 : config_.num_heads;
    rope.layout = layout;
    rope.skip_flag = layer_off;
    launch_rope_kv_write(rope, k_cache, v_cache, stream_.get());
  }

  // One-token linears run the GEMV, the only one that can read a skip flag (flags exist only
  // in decode steps); FFNSKIP_DECODE_GEMV=cublas moves the ungated dense ones to cuBLAS, for
  // comparison. Multi-token linears run cuBLAS.
  bool use_gemv(int n, const int32_t* skip_flag, const WeightSegment& segment) const {
    return n == 1 && (skip_flag != nullptr || !cublas_decode_ ||
                      segment.type != dense_tensor_type<T>());
  }

  bool runs_on_gemvs(const DeviceLinear& w, int n, const int32_t* skip_flag) const {
    bool all = n == 1;
    for (int i = 0; i < w.num_segments; ++i) all = all && use_gemv(n, skip_flag, w.segments[i]);
    return all;
  }

  GemvArgs<T> gemv_args(const DeviceLinear& w, const WeightSegment& segment,
                        const LinearInput& input, const int32_t* skip_flag) const {
    GemvArgs<T> g;
    g.weight = segment.data;
    g.weight_type = segment.type;
    g.bias = w.bias != nullptr ? w.bias + segment.first_row : nullptr;
    g.rows = segment.rows;
    g.cols = w.cols;
    g.x = input.x;
    if (input.norm_weight != nullptr) {
      g.norm_weight = input.norm_weight;
      g.norm_x = x_;
      g.norm_eps = config_.rms_norm_eps;
    }
    g.skip_flag = skip_flag;
    return g;
  }

  GemmArgs<T> gemm_args(const DeviceLinear& w, const WeightSegment& segment, const T* x, int n,
                        float* y, int y_stride, bool accumulate) const {
    GemmArgs<T> g;
    g.weight = segment.data;
    g.weight_type = segment.type;
    g.bias = w.bias != nullptr ? w.bias + segment.first_row : nullptr;
    g.rows = segment.rows;
    g.cols = w.cols;
    g.x = x;
    g.n = n;
    g.y = y + segment.first_row;
    g.y_stride = y_stride;
    g.accumulate = accumulate;
    g.scratch = gemm_scratch_;
    g.scratch_elements = gemm_scratch_elements_;
    return g;
  }

  // y[t, :] (row stride y_stride) = x[t, :] W^T + b, or += with accumulate; one kernel per
  // segment of W.
  void linear(const DeviceLinear& w, const LinearInput& x, int n, float* y, int y_stride,
              bool accumulate, const int32_t* skip_flag) {
    for (int i = 0; i < w.num_segments; ++i) {
      const WeightSegment& segment = w.segments[i];
      if (use_gemv(n, skip_flag, segment)) {
        GemvArgs<T> g = gemv_args(w, segment, x, skip_flag);
        g.y = y + segment.first_row;
        launch_gemv(g, accumulate ? GemvOutput::Accumulate : GemvOutput::Store, stream_.get());
      } else {
        gemm(cublas_.get(), stream_.get(), gemm_args(w, segment, x.x, n, y, y_stride, accumulate));
      }
    }
  }

  // act[t, :] = SwiGLU of the stacked gate/up projection of x[t, :]: fused into the GEMV when
  // gate and up share a type (one segment), else the projection then the SwiGLU kernel.
  void linear_swiglu(const DeviceLinear& w, const LinearInput& x, int n, T* act,
                     const int32_t* skip_flag) {
    if (w.num_segments == 1 && use_gemv(n, skip_flag, w.segments[0])) {
      GemvArgs<T> g = gemv_args(w, w.segments[0], x, skip_flag);
      g.act = act;
      launch_gemv(g, GemvOutput::SwiGLU, stream_.get());
      return;
    }
    linear(w, x, n, gate_up_, w.rows, /*accumulate=*/false, skip_flag);
    launch_swiglu(gate_up_, n, w.rows / 2, act, skip_flag, stream_.get());
  }

  // ---- state ----

  ModelConfig config_;
  DType requested_;
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
  PinnedMemory host_input_;   // the pass input of the next pass
  PinnedMemory host_output_;  // the step output, laid out as out_layout_
  Event input_copied_;
  GraphExec decode_graph_, draft_graph_;  // the policy's decode step, the draft's
  int decode_graph_kernels_ = 0;           // kernel nodes of decode_graph_; 0: not captured

  // Device pieces of arena_.
  DeviceModel<T> model_;
  T* k_cache_ = nullptr;  // [layers, max_seq_len, kv_dim]
  T* v_cache_ = nullptr;
  float* x_ = nullptr;  // residual stream [chunk, hidden]
  T* xn_ = nullptr;     // normed rows, input of the linears
  float* qkv_ = nullptr;
  T* attn_ = nullptr;
  float* gate_up_ = nullptr;  // prefill: stacked gate/up projection
  T* act_ = nullptr;
  float* ffn_out_ = nullptr;      // decode with scores: the FFN output before its residual add
  float* layer_input_ = nullptr;  // decode with layer scores: x_l
  float* attention_partial_ = nullptr;
  int32_t* pass_input_ = nullptr;  // [pos, decode index, tokens...]
  SkipState* state_ = nullptr;
  int32_t* skip_flags_ = nullptr;  // per layer: this step skips the FFN
  float* router_weight_ = nullptr;   // FiRST: [layers, hidden]
  float* router_bias_ = nullptr;     // FiRST: [layers]
  float* router_gate_ = nullptr;     // FiRST: per layer, the gate (NaN until routed)
  size_t kv_cache_bytes_ = 0;
  char* step_out_ = nullptr;  // logits, the step record, FiRST's flags (out_layout_)
  float* verify_logits_ = nullptr;  // [kMaxVerifyTokens, vocab]: a verify pass's logits
  char* cublas_workspace_ = nullptr;
  T* gemm_scratch_ = nullptr;  // GEMMs over blocks: a tile of weights as T, int8 activations
  int64_t gemm_scratch_elements_ = 0;

  PlanPair plans_;
  std::vector<char> record_head_[2];  // of the policy's plan and the draft's (record_head)
  int record_head_on_device_ = -1;    // which of them the step output holds
  std::vector<uint8_t> routed_off_on_host_;  // FiRST: routed_off(), as the routing pass read it
};

}  // namespace

template <typename T>
Backend* new_cuda_backend(const ModelConfig& config, const ModelView& model, int max_seq_len,
                          DType requested) {
  return new CudaBackend<T>(config, model, max_seq_len, requested);
}

#define FFNSKIP_INSTANTIATE(T) \
  template Backend* new_cuda_backend<T>(const ModelConfig&, const ModelView&, int, DType);
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
