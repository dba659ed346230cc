#include "ffnskip/config.h"

#include <cmath>
#include <stdexcept>

namespace ffnskip {

namespace {

void require(bool ok, const std::string& field, const std::string& why) {
  if (!ok) throw std::invalid_argument("invalid model config: " + field + " " + why);
}

// Far beyond any LLaMA-family model; values past them come from corrupt files and would
// otherwise size allocations before any tensor is checked.
constexpr int kMaxLayers = 1024;
constexpr int kMaxHidden = 1 << 17;
constexpr int kMaxIntermediate = 1 << 20;
constexpr int kMaxVocab = 1 << 24;
constexpr int kMaxHeads = 1024;
constexpr int kMaxHeadDim = 1024;

void require_at_most(int value, int limit, const std::string& field) {
  require(value <= limit, field,
          "(" + std::to_string(value) + ") exceeds " + std::to_string(limit));
}
}  // namespace

void ModelConfig::validate() const {
  require(vocab_size > 0, "vocab_size", "must be positive, got " + std::to_string(vocab_size));
  require(hidden_size > 0, "hidden_size", "must be positive, got " + std::to_string(hidden_size));
  require(intermediate_size > 0, "intermediate_size",
          "must be positive, got " + std::to_string(intermediate_size));
  require(num_layers > 0, "num_layers", "must be positive, got " + std::to_string(num_layers));
  require(num_heads > 0, "num_heads", "must be positive, got " + std::to_string(num_heads));
  require(num_kv_heads > 0, "num_kv_heads",
          "must be positive, got " + std::to_string(num_kv_heads));
  require(num_heads % num_kv_heads == 0, "num_kv_heads",
          "(" + std::to_string(num_kv_heads) + ") must divide num_heads (" +
              std::to_string(num_heads) + ")");
  require(head_dim > 0 && head_dim % 2 == 0, "head_dim",
          "must be positive and even, got " + std::to_string(head_dim));
  require_at_most(vocab_size, kMaxVocab, "vocab_size");
  require_at_most(hidden_size, kMaxHidden, "hidden_size");
  require_at_most(intermediate_size, kMaxIntermediate, "intermediate_size");
  require_at_most(num_layers, kMaxLayers, "num_layers");
  require_at_most(num_heads, kMaxHeads, "num_heads");
  require_at_most(head_dim, kMaxHeadDim, "head_dim");
  require(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, "rms_norm_eps", "must be positive");
  require(std::isfinite(rope_theta) && rope_theta > 0, "rope_theta", "must be positive");
  require(max_position_embeddings > 0, "max_position_embeddings", "must be positive");
  if (rope_type == RopeType::Llama3) {
    require(std::isfinite(rope_factor) && rope_factor > 0, "rope_scaling.factor",
            "must be positive");
    require(rope_low_freq_factor > 0 && rope_high_freq_factor > rope_low_freq_factor,
            "rope_scaling.high_freq_factor", "must exceed low_freq_factor > 0");
    require(rope_original_max_position > 0, "rope_scaling.original_max_position_embeddings",
            "must be positive");
  }
}

RopeType parse_rope_type(const std::string& name) {
  if (name == "default") return RopeType::Default;
  if (name == "llama3") return RopeType::Llama3;
  throw std::invalid_argument("invalid model config: rope_type '" + name +
                              "' is not supported (default, llama3)");
}

std::vector<float> rope_inv_freq(const ModelConfig& config) {
  const int half = config.head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = static_cast<float>(
        1.0 / std::pow(config.rope_theta, (2.0 * i) / static_cast<double>(config.head_dim)));
  }
  if (config.rope_type != RopeType::Llama3) return inv_freq;

  // transformers' _compute_llama3_parameters: long wavelengths are divided by `factor`,
  // short ones kept, the band between interpolated smoothly.
  const double old_context = config.rope_original_max_position;
  const double low_freq_wavelen = old_context / config.rope_low_freq_factor;
  const double high_freq_wavelen = old_context / config.rope_high_freq_factor;
  for (int i = 0; i < half; ++i) {
    const double freq = inv_freq[i];
    const double wavelen = 2.0 * M_PI / freq;
    double scaled = wavelen > low_freq_wavelen ? freq / config.rope_factor : freq;
    if (!(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen)) {
      const double smooth = (old_context / wavelen - config.rope_low_freq_factor) /
                            (config.rope_high_freq_factor - config.rope_low_freq_factor);
      scaled = (1.0 - smooth) * scaled / config.rope_factor + smooth * scaled;
    }
    inv_freq[i] = static_cast<float>(scaled);
  }
  return inv_freq;
}

}  // namespace ffnskip
