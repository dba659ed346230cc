#include "cpu_backend.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/half.h"
#include "../core/plan.h"
#include "../core/skip_rule.h"
#include "../core/tensor_types.h"
#include "activation.h"
#include "attention.h"
#include "linear.h"
#include "norm.h"
#include "rope.h"
#include "thread_pool.h"

namespace ffnskip {

namespace {

using cpu::LinearWeights;

// A weight matrix as the kernels read it: the checkpoint's data in place when the decoder may
// keep it (the view has an owner, a mapped file) and its type is kept; otherwise a copy in the
// storage type, converted row block by row block (no full-size float copy).
struct StoredMatrix {
  std::vector<uint8_t> copy;  // empty when in place
  std::shared_ptr<const void> owner;
  const void* data = nullptr;
  TensorType type = TensorType::F32;
  int64_t rows = 0, cols = 0;

  StoredMatrix(const TensorView& v, DType requested)
      : type(storage_type(v.type, requested)), rows(v.shape[0]), cols(v.shape.back()) {
    if (type == v.type && v.owner) {
      data = v.data;
      owner = v.owner;
      return;
    }
    copy.resize(static_cast<size_t>(rows * row_bytes(type, cols)));
    data = copy.data();
    if (type == v.type) {
      std::memcpy(copy.data(), v.data, copy.size());
      return;
    }
    const int64_t in_row = row_bytes(v.type, cols), out_row = row_bytes(type, cols);
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      dequantize(v.type, static_cast<const uint8_t*>(v.data) + r * in_row, cols, row.data());
      uint8_t* dst = copy.data() + r * out_row;
      if (type == TensorType::F32) {
        std::memcpy(dst, row.data(), sizeof(float) * cols);
        continue;
      }
      auto* half = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < cols; ++i) {
        half[i] = type == TensorType::BF16 ? float_to_bf16(row[i]) : float_to_f16(row[i]);
      }
    }
  }

  LinearWeights::Part part() const { return {data, type, rows}; }
  int64_t bytes() const { return rows * row_bytes(type, cols); }

  // Row `row` widened to fp32 (the embedding lookup).
  void read_row(int64_t row, float* out) const {
    dequantize(type, static_cast<const uint8_t*>(data) + row * row_bytes(type, cols), cols, out);
  }
};

// Linears that read the same input (q, k, v; gate, up): one LinearWeights of their parts.
struct Linear {
  std::vector<StoredMatrix> parts;
  std::vector<float> bias;  // stacked; empty when none of the parts has a bias
  LinearWeights view;

  Linear(std::initializer_list<const LinearView*> views, DType requested)
      : bias(stacked_bias(views)) {
    parts.reserve(views.size());
    for (const LinearView* v : views) parts.emplace_back(v->weight, requested);
    view.in = parts.front().cols;
    view.bias = bias.empty() ? nullptr : bias.data();
    for (const StoredMatrix& m : parts) {
      view.parts[view.num_parts++] = m.part();
      view.out += m.rows;
    }
  }

  int64_t bytes() const {
    int64_t total = 0;
    for (const StoredMatrix& m : parts) total += m.bytes();
    return total;
  }
};

struct CpuLayer {
  std::vector<float> attn_norm, ffn_norm;
  Linear qkv, o, gate_up, down;

  CpuLayer(const LayerView& v, DType requested)
      : attn_norm(to_float(v.attn_norm)),
        ffn_norm(to_float(v.ffn_norm)),
        qkv({&v.q, &v.k, &v.v}, requested),
        o({&v.o}, requested),
        gate_up({&v.gate, &v.up}, requested),
        down({&v.down}, requested) {}
};

size_t available_memory_bytes() {
  const long pages = sysconf(_SC_AVPHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<size_t>(pages) * page_size : SIZE_MAX;
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& config, const ModelView& model, int max_seq_len, int num_threads,
             DType requested, TensorType kv_cache_type)
      : config_(config),
        requested_(requested),
        pool_(num_threads),
        embed_(model.embed, requested),
        final_norm_(to_float(model.final_norm)),
        inv_freq_(rope_inv_freq(config)),
        kv_cache_type_(kv_cache_type) {
    kv_layer_stride_ = static_cast<int64_t>(max_seq_len) * config.kv_dim();
    const size_t kv_bytes = 2ull * config.num_layers * kv_layer_bytes();
    if (kv_bytes > available_memory_bytes()) {
      throw std::invalid_argument("max_seq_len " + std::to_string(max_seq_len) + " needs " +
                                  std::to_string(kv_bytes >> 20) + " MiB of KV cache, but only " +
                                  std::to_string(available_memory_bytes() >> 20) +
                                  " MiB of memory are available");
    }
    layers_.reserve(config.num_layers);
    for (const auto& layer : model.layers) layers_.emplace_back(layer, requested);
    if (!config.tie_word_embeddings) lm_head_.emplace(model.lm_head, requested);
    const StoredMatrix& head = lm_head_ ? *lm_head_ : embed_;
    lm_head_view_ = LinearWeights({head.part()}, config.hidden_size);

    kv_.resize(config.num_layers);
    layer_active_.resize(config.num_layers);
    router_gate_.resize(config.num_layers);
    router_mean_.resize(config.hidden_size);
    reset_routing();
    before_ffn_.resize(config.hidden_size);
    layer_input_.resize(config.hidden_size);
    reserve_tokens(1);
  }

  void set_plan(const ExecutionPlan& plan) override { plans_.target = plan; }
  void set_draft_plan(const ExecutionPlan& plan) override { plans_.draft = plan; }

  // A verify pass of more than kStepExactTokens tokens runs as chunks of that many, each
  // computing its tokens exactly as one-token steps do (linear.h), so that its logits are the
  // steps' bit for bit; up to kStepExactTokens tokens it is one pass reading each weight once.
  void run(const Pass& pass) override {
    const ExecutionPlan& plan = plans_.of(pass.kind);
    const int most = pass.kind == PassKind::Verify ? static_cast<int>(cpu::kStepExactTokens)
                                                   : pass.n;
    for_each_chunk(pass, most, [&](Pass& chunk, int done) {
      chunk.logits = pass.kind == PassKind::Verify
                         ? pass.logits + static_cast<int64_t>(done) * config_.vocab_size
                         : pass.logits;
      reserve_tokens(chunk.n);
      forward(*this, chunk, plan);
    });
  }

  void reset_routing() override {
    std::fill(layer_active_.begin(), layer_active_.end(), 1);
    std::fill(router_gate_.begin(), router_gate_.end(), NAN);
    for (int l = 0; l < config_.num_layers; ++l) allocate_kv(l);
  }

  void sequence_layers(std::vector<uint8_t>& active, std::vector<float>& gate) const override {
    active = layer_active_;
    gate = router_gate_;
  }

  WeightFootprint weight_footprint() const override {
    WeightFootprint f;
    std::map<TensorType, int64_t> by_type;
    auto add = [&](const StoredMatrix& m) { by_type[m.type] += m.bytes(); };
    add(embed_);
    if (lm_head_) add(*lm_head_);
    for (const CpuLayer& layer : layers_) {
      for (const Linear* linear : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) {
        for (const StoredMatrix& m : linear->parts) add(m);
      }
      f.layers.push_back({layer.qkv.parts[0].bytes(),
                          layer.qkv.parts[1].bytes() + layer.qkv.parts[2].bytes(),
                          layer.o.bytes(), layer.gate_up.bytes() + layer.down.bytes()});
    }
    f.bytes_by_type.assign(by_type.begin(), by_type.end());
    f.head = (lm_head_ ? *lm_head_ : embed_).bytes();
    return f;
  }

  TensorType held_type(TensorType stored) const override {
    return storage_type(stored, requested_);
  }

  int decode_step_kernels() const override { return 0; }  // no kernels, no graphs

  int64_t kv_cache_bytes() const override {
    int64_t layers = 0;
    for (const LayerCache& c : kv_) layers += c.k ? 1 : 0;
    return layers * 2 * kv_layer_bytes();
  }

  // ---- the sub-blocks of a pass, in the order forward() (plan.h) calls them ----

  void begin_pass(const Pass& pass) {
    if (is_step(pass.kind)) {
      const ExecutionPlan& plan = plans_.of(pass.kind);
      begin_token(plan.rule, state_, pass.decode_index);
      *pass.record = plan.decode_record;  // same sizes: copies without allocating
    }
    const int hidden = config_.hidden_size;
    for (int t = 0; t < pass.n; ++t) {
      embed_.read_row(pass.tokens[t], &x_[static_cast<size_t>(t) * hidden]);
    }
    cpu::rope_tables(inv_freq_.data(), config_.head_dim / 2, pass.pos, pass.n, cos_.data(),
                     sin_.data());
  }

  // x += Attn(RMSNorm(x)) writing K/V, or only the K/V (early exit), or nothing.
  void attention_block(const Pass& pass, int layer, const LayerPlan& plan) {
    StepRecord* record = pass.record;
    // Routing for the draft, this pass runs the layer whatever its router decides.
    const bool routing = pass.routes && plan.attention != AttentionMode::Skip;
    const bool runs = plan.attention != AttentionMode::Skip && routed_on(layer, plan);
    if (!runs && !(routing && plan.routed)) {
      if (record) record->layer_skipped[layer] = 1;
      return;
    }
    if (plan.layer_score) {
      std::copy(x_.begin(), x_.begin() + config_.hidden_size, layer_input_.begin());
    }
    const int n = pass.n, pos = pass.pos;
    const CpuLayer& w = layers_[layer];
    const int hidden = config_.hidden_size;
    const int q_dim = config_.q_dim();
    const int kv_dim = config_.kv_dim();
    const int64_t qkv_dim = q_dim + 2 * kv_dim;
    cpu::rms_norm(x_.data(), w.attn_norm.data(), n, hidden, config_.rms_norm_eps, xn_.data());
    if (routing && !route(layer, n) && plan.routed) {
      if (record) record->layer_skipped[layer] = 1;
      return;
    }
    float* q = qkv_.data();
    float* k = q + q_dim;
    if (plan.attention == AttentionMode::KVOnly) {
      // Early exit (decode, n == 1): only the K/V parts of the projection.
      cpu::linear(pool_, w.qkv.view.slice(1, 2), xn_.data(), 1, k);
    } else {
      cpu::linear(pool_, w.qkv.view, xn_.data(), n, q);
      cpu::apply_rope(q, n, qkv_dim, config_.num_heads, config_.head_dim, cos_.data(),
                      sin_.data(), config_.rope_interleaved);
    }
    cpu::apply_rope(k, n, qkv_dim, config_.num_kv_heads, config_.head_dim, cos_.data(),
                    sin_.data(), config_.rope_interleaved);

    uint8_t* k_cache = kv_[layer].k.get();
    uint8_t* v_cache = kv_[layer].v.get();
    const int head_dim = config_.head_dim;
    const int64_t head_stride = kv_layer_stride_ / config_.num_kv_heads;
    for (int t = 0; t < n; ++t) {
      const float* row = qkv_.data() + t * qkv_dim;
      for (int g = 0; g < config_.num_kv_heads; ++g) {
        const int64_t at = g * head_stride + static_cast<int64_t>(pos + t) * head_dim;
        store_cached(k_cache, at, row + q_dim + g * head_dim, head_dim);
        store_cached(v_cache, at, row + q_dim + kv_dim + g * head_dim, head_dim);
      }
    }
    if (plan.attention == AttentionMode::KVOnly) return;
    const cpu::AttentionShape shape{config_.num_heads, config_.num_kv_heads, head_dim, qkv_dim,
                                    head_stride, kv_cache_type_};
    cpu::attention(pool_, shape, q, n, pos, k_cache, v_cache, attn_.data());
    cpu::linear(pool_, w.o.view, attn_.data(), n, x_.data(), cpu::Output::Accumulate);
  }

  // x += FFN(RMSNorm(x)), unless the plan or the rule skips it for this token.
  void ffn_block(const Pass& pass, int layer, const LayerPlan& plan) {
    StepRecord* record = pass.record;
    const bool runs = routed_on(layer, plan);  // FFNMode::Skip covers dropped layers
    const SkipRule& rule = plans_.of(pass.kind).rule;
    if (!runs || rule_skips_ffn(plan.ffn, rule, state_, pass.decode_index, layer)) {
      if (record) record->ffn_skipped[layer] = 1;
    } else {
      run_ffn(pass, layer, plan);
    }
    if (plan.layer_score && runs) {
      record->layer_score[layer] = cosine(layer_input_.data(), x_.data());
    }
  }

  // The logits of the last token, or of every token of a verify pass (one GEMM).
  void end_pass(const Pass& pass) {
    const int hidden = config_.hidden_size;
    const int rows = pass.kind == PassKind::Verify ? pass.n : 1;
    const float* first = x_.data() + static_cast<int64_t>(pass.n - rows) * hidden;
    cpu::rms_norm(first, final_norm_.data(), rows, hidden, config_.rms_norm_eps, xn_.data());
    cpu::linear(pool_, lm_head_view_, xn_.data(), rows, pass.logits);
  }

 private:
  void run_ffn(const Pass& pass, int layer, const LayerPlan& plan) {
    const int n = pass.n;
    const CpuLayer& w = layers_[layer];
    const int hidden = config_.hidden_size;
    const int64_t inter = config_.intermediate_size;
    if (plan.ffn_score) std::copy(x_.begin(), x_.begin() + hidden, before_ffn_.begin());
    cpu::rms_norm(x_.data(), w.ffn_norm.data(), n, hidden, config_.rms_norm_eps, xn_.data());
    cpu::linear(pool_, w.gate_up.view, xn_.data(), n, gate_up_.data());
    cpu::swiglu(pool_, gate_up_.data(), n, inter, act_.data());
    cpu::linear(pool_, w.down.view, act_.data(), n, x_.data(), cpu::Output::Accumulate);
    if (plan.ffn_score) {
      record_score(state_, cosine(before_ffn_.data(), x_.data()));
      pass.record->score[layer] = state_.prev_score;
    }
  }

  float cosine(const float* a, const float* b) const {
    const int hidden = config_.hidden_size;
    return cosine_from_sums(cpu::dot(a, b, hidden), cpu::dot(a, a, hidden),
                            cpu::dot(b, b, hidden));
  }

  // Not routed off for this sequence by FiRST.
  bool routed_on(int layer, const LayerPlan& plan) const {
    return !(plan.routed && !layer_active_[layer]);
  }

  // FiRST at the first pass of a sequence: the router of `layer` reads the mean over the
  // pass's tokens (kRouterPromptTokens at most) of the layer's input norm (in xn_) and decides
  // for the whole sequence. A layer routed off for the draft keeps its cache (the policy's
  // passes write and read it).
  bool route(int layer, int n) {
    const ExecutionPlan& routing = plans_.routing();
    const int hidden = config_.hidden_size;
    const int tokens = std::min(n, kRouterPromptTokens);
    std::fill(router_mean_.begin(), router_mean_.end(), 0.0f);
    for (int t = 0; t < tokens; ++t) {
      cpu::axpy(1.0f, xn_.data() + static_cast<int64_t>(t) * hidden, router_mean_.data(), hidden);
    }
    for (float& v : router_mean_) v /= static_cast<float>(tokens);
    const float logit =
        cpu::dot(routing.router_weight.data() + static_cast<int64_t>(layer) * hidden,
                 router_mean_.data(), hidden) + routing.router_bias[layer];
    const bool keep = router_keeps_layer(logit, routing.threshold_logit);
    router_gate_[layer] = 1.0f / (1.0f + std::exp(-logit));
    layer_active_[layer] = keep ? 1 : 0;
    if (keep || !plans_.target.routes_sequences()) {
      allocate_kv(layer);
    } else {
      kv_[layer] = LayerCache{};  // a skipped layer holds no KV cache for this sequence
    }
    return keep;
  }

  // Uninitialised: positions are written before they are read, and untouched pages cost no
  // memory.
  void allocate_kv(int layer) {
    LayerCache& c = kv_[layer];
    if (c.k) return;
    c.k.reset(new uint8_t[kv_layer_bytes()]);
    c.v.reset(new uint8_t[kv_layer_bytes()]);
  }

  int64_t kv_layer_bytes() const { return row_bytes(kv_cache_type_, kv_layer_stride_); }

  // count floats into the cache from element `at` on, as its type holds them (fp16: rounded
  // to nearest even).
  void store_cached(uint8_t* cache, int64_t at, const float* values, int count) const {
    if (kv_cache_type_ == TensorType::F16) {
      auto* dst = reinterpret_cast<uint16_t*>(cache) + at;
      for (int i = 0; i < count; ++i) dst[i] = float_to_f16(values[i]);
    } else {
      std::memcpy(reinterpret_cast<float*>(cache) + at, values, sizeof(float) * count);
    }
  }

  // Activation buffers grow to the largest pass seen; decode steps never allocate.
  void reserve_tokens(int n) {
    if (n <= capacity_) return;
    const size_t tokens = static_cast<size_t>(n);
    x_.resize(tokens * config_.hidden_size);
    xn_.resize(tokens * config_.hidden_size);
    qkv_.resize(tokens * (config_.q_dim() + 2 * config_.kv_dim()));
    attn_.resize(tokens * config_.q_dim());
    gate_up_.resize(tokens * 2 * config_.intermediate_size);
    act_.resize(tokens * config_.intermediate_size);
    cos_.resize(tokens * (config_.head_dim / 2));
    sin_.resize(tokens * (config_.head_dim / 2));
    capacity_ = n;
  }

  ModelConfig config_;
  DType requested_;
  cpu::ThreadPool pool_;
  StoredMatrix embed_;
  std::optional<StoredMatrix> lm_head_;  // none when tied to the embedding
  std::vector<float> final_norm_, inv_freq_;
  std::vector<CpuLayer> layers_;
  LinearWeights lm_head_view_;

  struct LayerCache {
    std::unique_ptr<uint8_t[]> k, v;  // elements of kv_cache_type_
  };
  TensorType kv_cache_type_;     // F32 or F16
  int64_t kv_layer_stride_ = 0;  // elements of a layer's K (or V): [kv heads, max_seq_len, head_dim]
  std::vector<LayerCache> kv_;  // per layer; empty for a layer FiRST skips
  int capacity_ = 0;
  std::vector<float> before_ffn_;   // a_l of a decode step, for the saturation score
  std::vector<float> layer_input_;  // x_l of a decode step, for the layer score

  PlanPair plans_;
  SkipState state_;                    // the adaptive rule within a decode token
  std::vector<uint8_t> layer_active_;  // FiRST: the current sequence's routing
  std::vector<float> router_gate_;
  std::vector<float> router_mean_;
  std::vector<float> x_, xn_, qkv_, attn_, gate_up_, act_, cos_, sin_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const ModelConfig& config, const ModelView& model,
                                          int max_seq_len, int num_threads, DType dtype,
                                          DType kv_cache_dtype) {
  cpu::kernel_isa();  // a bad FFNSKIP_CPU_ISA fails here rather than inside a step
  const TensorType kv_cache_type =
      kv_cache_dtype == DType::F16 ? TensorType::F16 : TensorType::F32;
  return std::make_unique<CpuBackend>(config, model, max_seq_len, num_threads, dtype,
                                      kv_cache_type);
}

}  // namespace ffnskip
