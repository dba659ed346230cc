#include "model_view.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>

#include "tensor_types.h"

namespace ffnskip {

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorView::bytes() const {
  const int64_t cols = shape.empty() ? 1 : shape.back();
  return numel() / std::max<int64_t>(cols, 1) * row_bytes(type, cols);
}

namespace {

// Without iostreams, as policy.cpp's messages.
std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The first element (float types) or block (quantised: its scales) that is NaN or infinite,
// or -1. Blocks with finite scales have finite weights.
int64_t first_non_finite(const TensorView& t) {
  const int64_t count = t.numel();
  auto half_bad = [](uint16_t h) { return (h & 0x7C00u) == 0x7C00u; };
  auto bf16_bad = [](uint16_t h) { return (h & 0x7F80u) == 0x7F80u; };
  switch (t.type) {
    case TensorType::F32: {
      const auto* v = static_cast<const float*>(t.data);
      for (int64_t i = 0; i < count; ++i) {
        if (!std::isfinite(v[i])) return i;
      }
      return -1;
    }
    case TensorType::F16:
    case TensorType::BF16: {
      const auto* v = static_cast<const uint16_t*>(t.data);
      const auto bad = t.type == TensorType::F16 ? +half_bad : +bf16_bad;
      for (int64_t i = 0; i < count; ++i) {
        if (bad(v[i])) return i;
      }
      return -1;
    }
    default:
      break;
  }
  // Quantised: the fp16 scale fields of each block (d, and m/dmin where the format has one).
  const int64_t blocks = count / block_elements(t.type);
  const int64_t size = block_bytes(t.type);
  const auto* base = static_cast<const uint8_t*>(t.data);
  const int offset = t.type == TensorType::Q6_K ? offsetof(BlockQ6_K, d) : 0;
  const bool second = t.type == TensorType::Q4_1 || t.type == TensorType::Q5_1 ||
                      t.type == TensorType::Q4_K || t.type == TensorType::Q5_K;
  for (int64_t b = 0; b < blocks; ++b) {
    uint16_t h[2] = {0, 0};
    std::memcpy(h, base + b * size + offset, second ? 4 : 2);
    if (half_bad(h[0]) || half_bad(h[1])) return b;
  }
  return -1;
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
  const std::string what = "tensor '" + name + "' (" + tensor_type_name(view.type) + ")";
  if (shape.size() != 1 && shape.size() != 2) {
    throw std::invalid_argument(what + ": only vectors and matrices are supported");
  }
  if (is_quantized(view.type) && shape.size() != 2) {
    throw std::invalid_argument(what + ": a quantised tensor must be a matrix");
  }
  row_bytes(view.type, shape.back(), ("a row of " + what).c_str());
  const int64_t bad = first_non_finite(view);
  if (bad >= 0) {
    throw std::invalid_argument(
        "tensor '" + name + "' contains " +
        (is_quantized(view.type) ? "a NaN or infinite scale (" +
                                       std::string(tensor_type_name(view.type)) + " block " +
                                       std::to_string(bad) + ")"
                                 : "NaN or Inf (first at flat index " + std::to_string(bad) + ")"));
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
      const std::vector<float> values = to_float(p->bias);
      bias.insert(bias.end(), values.begin(), values.end());
    } else {
      bias.insert(bias.end(), rows, 0.0f);
    }
  }
  return bias;
}

std::vector<float> to_float(const TensorView& t) {
  std::vector<float> values(static_cast<size_t>(t.numel()));
  dequantize(t.type, t.data, t.numel(), values.data());
  return values;
}

TensorType storage_type(TensorType stored, DType requested) {
  switch (requested) {
    case DType::Auto: return stored;
    case DType::F32: return TensorType::F32;
    case DType::F16: return TensorType::F16;
    case DType::BF16: return TensorType::BF16;
  }
  return stored;
}

}  // namespace ffnskip
