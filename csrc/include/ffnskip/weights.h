// Borrowed views of checkpoint tensors, checked against a ModelConfig once, then handed to a
// backend that copies them into its own storage and layout.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "ffnskip/config.h"

namespace ffnskip {

// fp32, C-contiguous, owned by the caller for the duration of the Decoder constructor.
struct TensorView {
  const float* data = nullptr;
  std::vector<int64_t> shape;

  int64_t numel() const;
};

// Hugging Face tensor names ("model.layers.3.mlp.up_proj.weight") to views.
using WeightMap = std::unordered_map<std::string, TensorView>;

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

// Looks up every tensor the config needs and checks its shape; throws std::invalid_argument
// naming the tensor (and expected/found shapes) on the first problem.
ModelView collect_model_view(const ModelConfig& config, const WeightMap& weights);

}  // namespace ffnskip
