#include "cpu_backend.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/plan.h"
#include "../core/skip_rule.h"
#include "activation.h"
#include "attention.h"
#include "linear.h"
#include "norm.h"
#include "rope.h"
#include "simd.h"
#include "thread_pool.h"

namespace ffnskip {

namespace {

using cpu::LinearWeights;

std::vector<float> copy_of(const TensorView& t) {
  return std::vector<float>(t.data, t.data + t.numel());
}

// A matrix in the backend's storage precision (the other vector stays empty).
struct WeightMatrix {
  std::vector<float> f32;
  std::vector<uint16_t> half;  // bf16 or fp16 bits
  cpu::WeightType type;

  WeightMatrix(std::vector<float> values, cpu::WeightType storage) : type(storage) {
    if (type == cpu::WeightType::F32) {
      f32 = std::move(values);
    } else {
      half = cpu::to_half(values.data(), static_cast<int64_t>(values.size()), type);
    }
  }

  const void* data() const {
    return type == cpu::WeightType::F32 ? static_cast<const void*>(f32.data()) : half.data();
  }

  // Row `row` (`width` values) widened to fp32.
  void read_row(int64_t row, int64_t width, float* out) const {
    if (type == cpu::WeightType::F32) {
      std::memcpy(out, f32.data() + row * width, sizeof(float) * width);
      return;
    }
    const uint16_t* src = half.data() + row * width;
    for (int64_t i = 0; i < width; ++i) out[i] = cpu::half_to_float(src[i], type);
  }
};

// Several linears that read the same input, stacked row-wise so one pass computes them all.
struct StackedLinear {
  WeightMatrix weight;
  std::vector<float> bias;  // empty when none of the parts has a bias
  LinearWeights view;

  StackedLinear(std::initializer_list<const LinearView*> parts, cpu::WeightType storage)
      : weight(stacked_rows(parts), storage), bias(stacked_bias(parts)) {
    int64_t out = 0;
    for (const LinearView* p : parts) out += p->weight.shape[0];
    const int64_t in = (*parts.begin())->weight.shape[1];
    view = {weight.data(), bias.empty() ? nullptr : bias.data(), out, in, storage};
  }

  static std::vector<float> stacked_rows(std::initializer_list<const LinearView*> parts) {
    std::vector<float> rows;
    for (const LinearView* p : parts) {
      rows.insert(rows.end(), p->weight.data, p->weight.data + p->weight.numel());
    }
    return rows;
  }
};

struct CpuLayer {
  std::vector<float> attn_norm, ffn_norm;
  StackedLinear qkv, o, gate_up, down;

  CpuLayer(const LayerView& v, cpu::WeightType storage)
      : attn_norm(copy_of(v.attn_norm)),
        ffn_norm(copy_of(v.ffn_norm)),
        qkv({&v.q, &v.k, &v.v}, storage),
        o({&v.o}, storage),
        gate_up({&v.gate, &v.up}, storage),
        down({&v.down}, storage) {}
};

size_t available_memory_bytes() {
  const long pages = sysconf(_SC_AVPHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<size_t>(pages) * page_size : SIZE_MAX;
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& config, const ModelView& model, int max_seq_len, int num_threads,
             cpu::WeightType storage)
      : config_(config),
        pool_(num_threads),
        embed_(copy_of(model.embed), storage),
        final_norm_(copy_of(model.final_norm)),
        inv_freq_(rope_inv_freq(config)) {
    const size_t kv_bytes = 2ull * config.num_layers * max_seq_len * config.kv_dim() * sizeof(float);
    if (kv_bytes > available_memory_bytes()) {
      throw std::invalid_argument("max_seq_len " + std::to_string(max_seq_len) + " needs " +
                                  std::to_string(kv_bytes >> 20) + " MiB of KV cache, but only " +
                                  std::to_string(available_memory_bytes() >> 20) +
                                  " MiB of memory are available");
    }
    layers_.reserve(config.num_layers);
    for (const auto& layer : model.layers) layers_.emplace_back(layer, storage);
    if (!config.tie_word_embeddings) lm_head_.emplace(copy_of(model.lm_head), storage);
    const WeightMatrix& head = lm_head_ ? *lm_head_ : embed_;
    lm_head_view_ = {head.data(), nullptr, config.vocab_size, config.hidden_size, storage};

    kv_layer_stride_ = static_cast<int64_t>(max_seq_len) * config.kv_dim();
    kv_.resize(config.num_layers);
    layer_active_.resize(config.num_layers);
    router_gate_.resize(config.num_layers);
    router_mean_.resize(config.hidden_size);
    reset_routing();
    scratch_.resize(static_cast<size_t>(pool_.size()) * max_seq_len);
    before_ffn_.resize(config.hidden_size);
    layer_input_.resize(config.hidden_size);
    reserve_tokens(1);
  }

  void set_plan(const ExecutionPlan& plan) override { plan_ = plan; }

  void run(const Pass& pass) override {
    reserve_tokens(pass.n);
    forward(*this, pass, plan_);
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

  int64_t kv_cache_bytes() const override {
    int64_t layers = 0;
    for (const LayerCache& c : kv_) layers += c.k ? 1 : 0;
    return layers * 2 * kv_layer_stride_ * static_cast<int64_t>(sizeof(float));
  }

  // ---- the sub-blocks of a pass, in the order forward() (plan.h) calls them ----

  void begin_pass(const Pass& pass) {
    if (pass.record != nullptr) {
      begin_token(plan_.rule, state_, pass.decode_index);
      *pass.record = plan_.decode_record;  // same sizes: copies without allocating
    }
    const int hidden = config_.hidden_size;
    for (int t = 0; t < pass.n; ++t) {
      embed_.read_row(pass.tokens[t], hidden, &x_[static_cast<size_t>(t) * hidden]);
    }
    cpu::rope_tables(inv_freq_.data(), config_.head_dim / 2, pass.pos, pass.n, cos_.data(),
                     sin_.data());
  }

  // x += Attn(RMSNorm(x)) writing K/V, or only the K/V (early exit), or nothing.
  void attention_block(const Pass& pass, int layer, const LayerPlan& plan) {
    StepRecord* record = pass.record;
    const bool routing = plan.routed && pass.routes;
    if (!layer_runs(layer, plan) && !routing) {
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
    if (routing && !route(layer, n)) {
      if (record) record->layer_skipped[layer] = 1;
      return;
    }
    float* q = qkv_.data();
    float* k = q + q_dim;
    if (plan.attention == AttentionMode::KVOnly) {
      // Early exit (decode, n == 1): only the K/V rows of the stacked projection.
      cpu::linear(pool_, w.qkv.view.rows(q_dim, 2 * kv_dim), xn_.data(), 1, k);
    } else {
      cpu::linear(pool_, w.qkv.view, xn_.data(), n, q);
      cpu::apply_rope(q, n, qkv_dim, config_.num_heads, config_.head_dim, cos_.data(),
                      sin_.data());
    }
    cpu::apply_rope(k, n, qkv_dim, config_.num_kv_heads, config_.head_dim, cos_.data(),
                    sin_.data());

    float* k_cache = kv_[layer].k.get();
    float* v_cache = kv_[layer].v.get();
    for (int t = 0; t < n; ++t) {
      const float* row = qkv_.data() + t * qkv_dim;
      std::memcpy(k_cache + static_cast<int64_t>(pos + t) * kv_dim, row + q_dim,
                  sizeof(float) * kv_dim);
      std::memcpy(v_cache + static_cast<int64_t>(pos + t) * kv_dim, row + q_dim + kv_dim,
                  sizeof(float) * kv_dim);
    }
    if (plan.attention == AttentionMode::KVOnly) return;
    const cpu::AttentionShape shape{config_.num_heads, config_.num_kv_heads, config_.head_dim,
                                    qkv_dim, kv_dim};
    cpu::attention(pool_, shape, q, n, pos, k_cache, v_cache, scratch_.data(), attn_.data());
    cpu::linear(pool_, w.o.view, attn_.data(), n, x_.data(), cpu::Output::Accumulate);
  }

  // x += FFN(RMSNorm(x)), unless the plan or the rule skips it for this token.
  void ffn_block(const Pass& pass, int layer, const LayerPlan& plan) {
    StepRecord* record = pass.record;
    const bool runs = layer_runs(layer, plan);
    if (!runs || rule_skips_ffn(plan.ffn, plan_.rule, state_, pass.decode_index, layer)) {
      if (record) record->ffn_skipped[layer] = 1;
    } else {
      run_ffn(pass, layer, plan);
    }
    if (plan.layer_score && runs) {
      record->layer_score[layer] = cosine(layer_input_.data(), x_.data());
    }
  }

  void end_pass(const Pass& pass) {
    const int hidden = config_.hidden_size;
    const float* last = x_.data() + static_cast<int64_t>(pass.n - 1) * hidden;
    cpu::rms_norm(last, final_norm_.data(), 1, hidden, config_.rms_norm_eps, xn_.data());
    cpu::linear(pool_, lm_head_view_, xn_.data(), 1, pass.logits);
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

  // Neither dropped by the plan nor routed off for this sequence by FiRST.
  bool layer_runs(int layer, const LayerPlan& plan) const {
    return plan.attention != AttentionMode::Skip && !(plan.routed && !layer_active_[layer]);
  }

  // FiRST at the first pass of a sequence: the router of `layer` reads the mean over the
  // pass's tokens (kRouterPromptTokens at most) of the layer's input norm (in xn_) and decides
  // for the whole sequence.
  bool route(int layer, int n) {
    const int hidden = config_.hidden_size;
    const int tokens = std::min(n, kRouterPromptTokens);
    std::fill(router_mean_.begin(), router_mean_.end(), 0.0f);
    for (int t = 0; t < tokens; ++t) {
      cpu::axpy(1.0f, xn_.data() + static_cast<int64_t>(t) * hidden, router_mean_.data(), hidden);
    }
    for (float& v : router_mean_) v /= static_cast<float>(tokens);
    const float logit =
        cpu::dot(plan_.router_weight.data() + static_cast<int64_t>(layer) * hidden,
                 router_mean_.data(), hidden) + plan_.router_bias[layer];
    const bool keep = router_keeps_layer(logit, plan_.threshold_logit);
    router_gate_[layer] = 1.0f / (1.0f + std::exp(-logit));
    layer_active_[layer] = keep ? 1 : 0;
    if (keep) {
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
    c.k.reset(new float[kv_layer_stride_]);
    c.v.reset(new float[kv_layer_stride_]);
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
  cpu::ThreadPool pool_;
  WeightMatrix embed_;
  std::optional<WeightMatrix> lm_head_;  // none when tied to the embedding
  std::vector<float> final_norm_, inv_freq_;
  std::vector<CpuLayer> layers_;
  LinearWeights lm_head_view_;

  struct LayerCache {
    std::unique_ptr<float[]> k, v;
  };
  int64_t kv_layer_stride_ = 0;
  std::vector<LayerCache> kv_;  // per layer; empty for a layer FiRST skips
  std::vector<float> scratch_;
  int capacity_ = 0;
  std::vector<float> before_ffn_;   // a_l of a decode step, for the saturation score
  std::vector<float> layer_input_;  // x_l of a decode step, for the layer score

  ExecutionPlan plan_;
  SkipState state_;                    // the adaptive rule within a decode token
  std::vector<uint8_t> layer_active_;  // FiRST: the current sequence's routing
  std::vector<float> router_gate_;
  std::vector<float> router_mean_;
  std::vector<float> x_, xn_, qkv_, attn_, gate_up_, act_, cos_, sin_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const ModelConfig& config, const ModelView& model,
                                          int max_seq_len, int num_threads, DType dtype) {
  cpu::kernel_isa();  // a bad FFNSKIP_CPU_ISA fails here rather than inside a step
  cpu::WeightType storage = cpu::WeightType::F32;
  if (dtype == DType::BF16) storage = cpu::WeightType::BF16;
  if (dtype == DType::F16) storage = cpu::WeightType::F16;
  return std::make_unique<CpuBackend>(config, model, max_seq_len, num_threads, storage);
}

}  // namespace ffnskip
