#include "ffnskip/weights.h"

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

LinearView need_linear(const WeightMap& weights, const std::string& prefix, int64_t out,
                       int64_t in, bool has_bias) {
  LinearView view;
  view.weight = need(weights, prefix + ".weight", {out, in});
  if (has_bias) view.bias = need(weights, prefix + ".bias", {out});
  return view;
}

}  // namespace

ModelView collect_model_view(const ModelConfig& config, const WeightMap& weights) {
  config.validate();
  const int64_t hidden = config.hidden_size;
  const int64_t inter = config.intermediate_size;
  ModelView model;
  model.embed = need(weights, "model.embed_tokens.weight", {config.vocab_size, hidden});
  for (int l = 0; l < config.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerView layer;
    layer.attn_norm = need(weights, p + "input_layernorm.weight", {hidden});
    layer.q = need_linear(weights, p + "self_attn.q_proj", config.q_dim(), hidden,
                          config.qkv_bias);
    layer.k = need_linear(weights, p + "self_attn.k_proj", config.kv_dim(), hidden,
                          config.qkv_bias);
    layer.v = need_linear(weights, p + "self_attn.v_proj", config.kv_dim(), hidden,
                          config.qkv_bias);
    layer.o = need_linear(weights, p + "self_attn.o_proj", hidden, config.q_dim(), config.o_bias);
    layer.ffn_norm = need(weights, p + "post_attention_layernorm.weight", {hidden});
    layer.gate = need_linear(weights, p + "mlp.gate_proj", inter, hidden, config.mlp_bias);
    layer.up = need_linear(weights, p + "mlp.up_proj", inter, hidden, config.mlp_bias);
    layer.down = need_linear(weights, p + "mlp.down_proj", hidden, inter, config.mlp_bias);
    model.layers.push_back(layer);
  }
  model.final_norm = need(weights, "model.norm.weight", {hidden});
  model.lm_head = config.tie_word_embeddings
                      ? model.embed
                      : need(weights, "lm_head.weight", {config.vocab_size, hidden});
  return model;
}

}  // namespace ffnskip
