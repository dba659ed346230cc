#include "model_view.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace ffnskip {

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

std::string layer_prefix(int layer) { return "model.layers." + std::to_string(layer) + "."; }

// The names of layer tensors after the prefix, in model_tensors order.
constexpr const char* kAttnNorm = "input_layernorm.weight";
constexpr const char* kFfnNorm = "post_attention_layernorm.weight";

TensorView need(const WeightMap& weights, const std::string& name,
                const std::vector<int64_t>& shape) {
  auto it = weights.find(name);
  if (it == weights.end()) throw std::invalid_argument("missing tensor '" + name + "'");
  if (it->second.shape != shape) {
    throw std::invalid_argument("tensor '" + name + "' has shape " +
                                shape_str(it->second.shape) + ", expected " + shape_str(shape));
  }
  const TensorView& view = it->second;
  if (view.data == nullptr) throw std::invalid_argument("tensor '" + name + "' has no data");
  const int64_t count = view.numel();
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(view.data[i])) {
      const char* what = std::isnan(view.data[i]) ? "NaN" : "Inf";
      throw std::invalid_argument("tensor '" + name + "' contains " + what +
                                  " (first at flat index " + std::to_string(i) + ")");
    }
  }
  return view;
}

struct LinearShape {
  const char* name;  // after the layer prefix, without ".weight"
  int64_t out, in;
  bool bias;
};

// The linears of one layer, in model_tensors order.
std::vector<LinearShape> layer_linears(const ModelConfig& c) {
  const int64_t h = c.hidden_size, f = c.intermediate_size, q = c.q_dim(), kv = c.kv_dim();
  return {{"self_attn.q_proj", q, h, c.qkv_bias},   {"self_attn.k_proj", kv, h, c.qkv_bias},
          {"self_attn.v_proj", kv, h, c.qkv_bias},  {"self_attn.o_proj", h, q, c.o_bias},
          {"mlp.gate_proj", f, h, c.mlp_bias},      {"mlp.up_proj", f, h, c.mlp_bias},
          {"mlp.down_proj", h, f, c.mlp_bias}};
}

LinearView need_linear(const WeightMap& weights, const std::string& prefix,
                       const LinearShape& s) {
  LinearView view;
  view.weight = need(weights, prefix + s.name + ".weight", {s.out, s.in});
  if (s.bias) view.bias = need(weights, prefix + s.name + ".bias", {s.out});
  return view;
}

}  // namespace

std::vector<TensorSpec> model_tensors(const ModelConfig& c) {
  const int64_t h = c.hidden_size;
  std::vector<TensorSpec> specs = {{"model.embed_tokens.weight", {c.vocab_size, h}}};
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    specs.push_back({p + kAttnNorm, {h}});
    for (const LinearShape& s : layer_linears(c)) {
      if (std::string(s.name) == "mlp.gate_proj") specs.push_back({p + kFfnNorm, {h}});
      specs.push_back({p + s.name + ".weight", {s.out, s.in}});
      if (s.bias) specs.push_back({p + s.name + ".bias", {s.out}});
    }
  }
  specs.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) specs.push_back({"lm_head.weight", {c.vocab_size, h}});
  return specs;
}

ModelView collect_model_view(const ModelConfig& config, const WeightMap& weights) {
  config.validate();
  const int64_t hidden = config.hidden_size;
  const std::vector<LinearShape> linears = layer_linears(config);
  ModelView model;
  model.embed = need(weights, "model.embed_tokens.weight", {config.vocab_size, hidden});
  for (int l = 0; l < config.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    LayerView layer;
    layer.attn_norm = need(weights, p + kAttnNorm, {hidden});
    LinearView* parts[] = {&layer.q, &layer.k, &layer.v, &layer.o,
                           &layer.gate, &layer.up, &layer.down};
    for (size_t i = 0; i < linears.size(); ++i) {
      if (parts[i] == &layer.gate) layer.ffn_norm = need(weights, p + kFfnNorm, {hidden});
      *parts[i] = need_linear(weights, p, linears[i]);
    }
    model.layers.push_back(layer);
  }
  model.final_norm = need(weights, "model.norm.weight", {hidden});
  model.lm_head = config.tie_word_embeddings
                      ? model.embed
                      : need(weights, "lm_head.weight", {config.vocab_size, hidden});
  return model;
}

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

}  // namespace ffnskip
