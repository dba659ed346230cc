// The weights a Decoder is made from: views of checkpoint tensors under Hugging Face names, each
// in the format the checkpoint stores it, and the list of tensors (names and shapes) a model of
// a given config needs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ffnskip/config.h"

namespace ffnskip {

// How a tensor's elements are stored: floats, or GGUF's block quantisations (a row of a
// quantised matrix is a sequence of blocks of 32 or 256 elements; csrc/core/tensor_types.h).
enum class TensorType : uint8_t { F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K };

const std::vector<std::string>& tensor_type_names();  // "F32", "F16", ..., in enum order
const char* tensor_type_name(TensorType type);
TensorType parse_tensor_type(const std::string& name);  // throws std::invalid_argument

// A C-contiguous tensor in its stored format. Without an owner the data is borrowed for the
// duration of the Decoder constructor (which copies it); with one (a memory-mapped file, say)
// the decoder may keep reading it in place and keeps the owner alive as long as it does.
struct TensorView {
  const void* data = nullptr;
  TensorType type = TensorType::F32;
  std::vector<int64_t> shape;
  std::shared_ptr<const void> owner;

  int64_t numel() const;
  int64_t bytes() const;  // throws std::invalid_argument when rows are not whole blocks
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
