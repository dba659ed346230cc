// The weights of a model as the backends read them: every tensor the config needs, looked up
// in a WeightMap and checked once (shape, finite values). Backends copy them into their own
// storage and layout.
#pragma once

#include <initializer_list>
#include <vector>

#include "ffnskip/config.h"
#include "ffnskip/decoder.h"
#include "ffnskip/weights.h"

namespace ffnskip {

// A linear layer y = x W^T + b; bias.data is null when the layer has none.
struct LinearView {
  TensorView weight;  // [out_features, in_features]
  TensorView bias;    // [out_features] or empty
};

struct LayerView {
  TensorView attn_norm;
  LinearView q, k, v, o;
  TensorView ffn_norm;
  LinearView gate, up, down;
};

struct ModelView {
  TensorView embed;  // [vocab, hidden]
  std::vector<LayerView> layers;
  TensorView final_norm;
  TensorView lm_head;  // the embedding table when tied
};

// Looks up every tensor of model_tensors(config) and checks it; throws std::invalid_argument
// naming the tensor (and expected/found shapes, or the first NaN/Inf) on the first problem.
ModelView collect_model_view(const ModelConfig& config, const WeightMap& weights);

// The biases of linears stacked row-wise (q, k, v; gate, up): zeros for parts without one;
// empty when no part has a bias.
std::vector<float> stacked_bias(std::initializer_list<const LinearView*> parts);

// A tensor's values in fp32, whatever its type (norms, biases, conversions).
std::vector<float> to_float(const TensorView& t);

// The type a backend stores a weight matrix in: its own (DType::Auto) or the requested one.
TensorType storage_type(TensorType stored, DType requested);

}  // namespace ffnskip
