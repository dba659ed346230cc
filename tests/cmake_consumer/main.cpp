// Builds a two-layer model from constant weights through the installed headers and decodes.
#include <cstdio>
#include <string>
#include <vector>

#include "ffnskip/decoder.h"

int main() {
  ffnskip::ModelConfig c;
  c.vocab_size = 32; c.hidden_size = 16; c.intermediate_size = 24; c.num_layers = 2;
  c.num_heads = 2; c.num_kv_heads = 1; c.head_dim = 8; c.tie_word_embeddings = true;
  std::vector<std::vector<float>> storage;
  ffnskip::WeightMap weights;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    storage.emplace_back(n);
    for (int64_t i = 0; i < n; ++i) storage.back()[i] = 0.01f * static_cast<float>(i % 7) - 0.02f;
    weights[name] = {storage.back().data(), ffnskip::TensorType::F32, shape, nullptr};
  };
  storage.reserve(64);
  add("model.embed_tokens.weight", {32, 16});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {16});
    add(p + "self_attn.q_proj.weight", {16, 16});
    add(p + "self_attn.k_proj.weight", {8, 16});
    add(p + "self_attn.v_proj.weight", {8, 16});
    add(p + "self_attn.o_proj.weight", {16, 16});
    add(p + "post_attention_layernorm.weight", {16});
    add(p + "mlp.gate_proj.weight", {24, 16});
    add(p + "mlp.up_proj.weight", {24, 16});
    add(p + "mlp.down_proj.weight", {16, 24});
  }
  add("model.norm.weight", {16});
  ffnskip::DecoderOptions options;
  options.max_seq_len = 8;
  ffnskip::Decoder decoder(c, weights, options);
  std::vector<float> logits(c.vocab_size);
  const int32_t prompt[] = {1, 2, 3};
  decoder.prefill(prompt, 3, logits.data());
  decoder.step(4, logits.data());
  std::printf("position=%d logit0=%f\n", decoder.position(), logits[0]);
  return decoder.position() == 4 ? 0 : 1;
}
