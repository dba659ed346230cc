// Decode throughput of the engine on random weights of a given shape (no checkpoint needed).
//   bench_decode [--preset smollm2-135m|llama2-7b|llama3-8b] [--layers N] [--hidden N]
//                [--intermediate N] [--heads N] [--kv-heads N] [--vocab N] [--tokens N]
//                [--prompt N] [--threads N] [--device cpu|cuda]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "ffnskip/decoder.h"

using namespace ffnskip;

namespace {

ModelConfig preset(const std::string& name) {
  ModelConfig c;
  c.rms_norm_eps = 1e-5f;
  if (name == "smollm2-135m") {
    c.vocab_size = 49152; c.hidden_size = 576; c.intermediate_size = 1536; c.num_layers = 30;
    c.num_heads = 9; c.num_kv_heads = 3; c.tie_word_embeddings = true; c.rope_theta = 100000;
  } else if (name == "llama2-7b") {
    c.vocab_size = 32000; c.hidden_size = 4096; c.intermediate_size = 11008; c.num_layers = 32;
    c.num_heads = 32; c.num_kv_heads = 32;
  } else if (name == "llama3-8b") {
    c.vocab_size = 128256; c.hidden_size = 4096; c.intermediate_size = 14336; c.num_layers = 32;
    c.num_heads = 32; c.num_kv_heads = 8; c.rope_theta = 500000;
  } else {
    throw std::invalid_argument("unknown preset '" + name + "'");
  }
  c.head_dim = c.hidden_size / c.num_heads;
  c.max_position_embeddings = 4096;
  return c;
}

// Bytes of weights one decode token reads: every layer, the final norm and the LM head
// (the embedding row gather is not counted).
double weight_bytes_per_token(const ModelConfig& c) {
  const double h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), f = c.intermediate_size;
  const double layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h;
  return 4.0 * (c.num_layers * layer + h + static_cast<double>(c.vocab_size) * h);
}

struct RandomWeights {
  std::vector<std::vector<float>> storage;
  WeightMap map;
  std::mt19937 rng{1234};

  void add(const std::string& name, std::vector<int64_t> shape, float scale) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> data(n);
    std::uniform_real_distribution<float> dist(-scale, scale);
    for (auto& x : data) x = dist(rng);
    storage.push_back(std::move(data));
    map[name] = TensorView{storage.back().data(), std::move(shape)};
  }
};

WeightMap random_weights(const ModelConfig& c, RandomWeights& w) {
  const int64_t h = c.hidden_size, f = c.intermediate_size;
  const float s = 1.0f / std::sqrt(static_cast<float>(h));
  w.storage.reserve(16 * c.num_layers);
  w.add("model.embed_tokens.weight", {c.vocab_size, h}, 1.0f);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w.add(p + "input_layernorm.weight", {h}, 1.0f);
    w.add(p + "self_attn.q_proj.weight", {c.q_dim(), h}, s);
    w.add(p + "self_attn.k_proj.weight", {c.kv_dim(), h}, s);
    w.add(p + "self_attn.v_proj.weight", {c.kv_dim(), h}, s);
    w.add(p + "self_attn.o_proj.weight", {h, c.q_dim()}, s);
    w.add(p + "post_attention_layernorm.weight", {h}, 1.0f);
    w.add(p + "mlp.gate_proj.weight", {f, h}, s);
    w.add(p + "mlp.up_proj.weight", {f, h}, s);
    w.add(p + "mlp.down_proj.weight", {h, f}, 1.0f / std::sqrt(static_cast<float>(f)));
  }
  w.add("model.norm.weight", {h}, 1.0f);
  if (!c.tie_word_embeddings) w.add("lm_head.weight", {c.vocab_size, h}, s);
  return w.map;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string preset_name = "smollm2-135m", device = "cpu";
    int tokens = 64, prompt = 16, threads = 0;
    ModelConfig c = preset(preset_name);
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (i + 1 >= argc) throw std::invalid_argument("missing value after " + arg);
      const std::string value = argv[++i];
      if (arg == "--preset") { preset_name = value; c = preset(value); }
      else if (arg == "--layers") c.num_layers = std::stoi(value);
      else if (arg == "--hidden") c.hidden_size = std::stoi(value);
      else if (arg == "--intermediate") c.intermediate_size = std::stoi(value);
      else if (arg == "--heads") c.num_heads = std::stoi(value);
      else if (arg == "--kv-heads") c.num_kv_heads = std::stoi(value);
      else if (arg == "--vocab") c.vocab_size = std::stoi(value);
      else if (arg == "--tokens") tokens = std::stoi(value);
      else if (arg == "--prompt") prompt = std::stoi(value);
      else if (arg == "--threads") threads = std::stoi(value);
      else if (arg == "--device") device = value;
      else throw std::invalid_argument("unknown argument " + arg);
    }
    c.head_dim = c.hidden_size / c.num_heads;

    RandomWeights storage;
    const WeightMap weights = random_weights(c, storage);
    DecoderOptions options;
    options.device = device == "cuda" ? Device::CUDA : Device::CPU;
    options.max_seq_len = prompt + tokens + 1;
    options.num_threads = threads;
    Decoder decoder(c, weights, options);
    storage.storage.clear();

    std::vector<int32_t> prompt_ids(prompt);
    for (int i = 0; i < prompt; ++i) prompt_ids[i] = (i * 7919) % c.vocab_size;
    std::vector<float> logits(c.vocab_size);
    decoder.prefill(prompt_ids.data(), prompt, logits.data());
    decoder.step(1, logits.data());  // warm-up

    const auto start = std::chrono::steady_clock::now();
    int32_t token = 2;
    for (int i = 0; i < tokens; ++i) {
      decoder.step(token, logits.data());
      token = static_cast<int32_t>((token * 31 + 7) % c.vocab_size);
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double tok_s = tokens / seconds;
    const double bytes = weight_bytes_per_token(c);
    std::printf("preset=%s device=%s layers=%d hidden=%d intermediate=%d heads=%d/%d vocab=%d\n",
                preset_name.c_str(), device.c_str(), c.num_layers, c.hidden_size,
                c.intermediate_size, c.num_heads, c.num_kv_heads, c.vocab_size);
    std::printf("decode: %.2f tokens/s, %.1f MB of weights per token, %.2f GB/s\n", tok_s,
                bytes / 1e6, bytes * tok_s / 1e9);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_decode: %s\n", e.what());
    return 1;
  }
}
