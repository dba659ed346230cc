// Model configuration of a LLaMA-family decoder and the checks every user of the library gets.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ffnskip {

enum class RopeType { Default, Llama3 };

struct ModelConfig {
  std::string architecture = "llama";
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float rms_norm_eps = 1e-5f;
  double rope_theta = 10000.0;
  RopeType rope_type = RopeType::Default;
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  int rope_original_max_position = 8192;
  // Q and K rows in llama.cpp's order (a llama GGUF read as stored): RoPE rotates adjacent
  // pairs (x_2i, x_2i+1) instead of the two halves of each head, which gives the same attention.
  bool rope_interleaved = false;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  int max_position_embeddings = 2048;

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }

  // Throws std::invalid_argument naming the first offending field.
  void validate() const;
};

// Rotary inverse frequencies (head_dim / 2 values), as transformers computes them,
// including the llama3 piecewise scaling.
std::vector<float> rope_inv_freq(const ModelConfig& config);

RopeType parse_rope_type(const std::string& name);

}  // namespace ffnskip
