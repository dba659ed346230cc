// The weights a Decoder is made from: borrowed views of checkpoint tensors under Hugging Face
// names, and the list of tensors (names and shapes) a model of a given config needs.
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

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // [out_features, in_features] for linears
};

// Every tensor the engine reads for `config`, in a fixed order: the embedding, then per
// layer its norms and linears (biases where the config has them), the final norm and, when
// the embeddings are untied, the LM head.
std::vector<TensorSpec> model_tensors(const ModelConfig& config);

}  // namespace ffnskip
