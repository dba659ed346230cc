#include "ffnskip/policy.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace ffnskip {

namespace {

void require(bool ok, const std::string& field, const std::string& why) {
  if (!ok) throw std::invalid_argument("invalid policy: " + field + " " + why);
}

bool contains(const std::vector<int32_t>& sorted, int layer) {
  return std::binary_search(sorted.begin(), sorted.end(), layer);
}

}  // namespace

float router_threshold_logit(float threshold) {
  if (threshold <= 0.0f) return -INFINITY;
  if (threshold >= 1.0f) return INFINITY;
  return std::log(threshold / (1.0f - threshold));
}

void SkipPolicy::validate(int num_layers, int hidden_size) const {
  const SkipRule& r = rule;
  const std::string n = std::to_string(num_layers);
  require(r.num_layers == num_layers, "num_layers",
          "is " + std::to_string(r.num_layers) + ", the model has " + n);
  for (size_t i = 0; i < layers.size(); ++i) {
    require(layers[i] >= 0 && layers[i] < num_layers, "layers",
            "names layer " + std::to_string(layers[i]) + ", the model has layers 0.." +
                std::to_string(num_layers - 1));
    require(i == 0 || layers[i] > layers[i - 1], "layers", "must be sorted and unique");
  }
  switch (r.kind) {
    case PolicyKind::Dense:
      break;
    case PolicyKind::FFNSkip:
      require(std::isfinite(r.threshold) && r.threshold >= -1.0f && r.threshold <= 1.0f,
              "threshold", "must be in [-1, 1]");
      require(r.warmup_tokens >= 0, "warmup_tokens", "must be >= 0");
      require(r.full_token_interval >= 0, "full_token_interval", "must be >= 0");
      require(r.max_skips >= 0, "max_skips_per_token", "must be >= 0");
      [[fallthrough]];
    case PolicyKind::RandomFFN:
      require(r.cold_start >= 0, "cold_start", "must be >= 0");
      require(r.cold_end >= 0, "cold_end", "must be >= 0");
      require(r.cold_start + r.cold_end < num_layers, "cold_start + cold_end",
              "cover every layer (" + std::to_string(r.cold_start + r.cold_end) + " of " + n +
                  ")");
      require(r.max_skips >= 0, "k", "must be >= 0");
      break;
    case PolicyKind::StaticFFN:
    case PolicyKind::LayerDrop:
      break;
    case PolicyKind::EarlyExit:
      require(r.exit_layer >= 1 && r.exit_layer <= num_layers, "exit_layer",
              "must be in [1, " + n + "], got " + std::to_string(r.exit_layer));
      break;
    case PolicyKind::FiRST: {
      require(std::isfinite(r.threshold) && r.threshold >= 0.0f && r.threshold <= 1.0f,
              "threshold", "must be in [0, 1]");
      require(router_bias.size() == static_cast<size_t>(num_layers), "routers",
              "have " + std::to_string(router_bias.size()) + " biases, the model has " + n +
                  " layers");
      if (hidden_size > 0) {
        const size_t expected = static_cast<size_t>(num_layers) * hidden_size;
        require(router_weight.size() == expected, "routers",
                "have " + std::to_string(router_weight.size()) + " weights, expected " + n +
                    " x " + std::to_string(hidden_size));
      }
      const auto finite = [](float v) { return std::isfinite(v); };
      require(std::all_of(router_weight.begin(), router_weight.end(), finite) &&
                  std::all_of(router_bias.begin(), router_bias.end(), finite),
              "routers", "contain NaN or infinite values");
      break;
    }
    default:
      throw std::invalid_argument("invalid policy: unknown kind");
  }
  if (r.kind == PolicyKind::LayerDrop) {
    require(static_cast<int>(layers.size()) < num_layers, "layers", "would drop every layer");
  }
}

LayerPlan plan_layer(const SkipPolicy& policy, int layer, bool decode) {
  LayerPlan plan;
  const SkipRule& r = policy.rule;
  switch (r.kind) {
    case PolicyKind::Dense:
      break;
    case PolicyKind::LayerDrop:
      if (contains(policy.layers, layer)) {
        plan.attention = AttentionMode::Skip;
        plan.ffn = FFNMode::Skip;
      }
      break;
    case PolicyKind::FFNSkip:  // the rule itself checks eligibility, as in the paper's loop
      if (decode) plan.ffn = FFNMode::Adaptive;
      break;
    case PolicyKind::RandomFFN:
      if (decode) plan.ffn = FFNMode::Random;
      break;
    case PolicyKind::StaticFFN:
      if (decode && contains(policy.layers, layer)) plan.ffn = FFNMode::Skip;
      break;
    case PolicyKind::EarlyExit:
      if (decode && layer >= r.exit_layer) {
        plan.attention = AttentionMode::KVOnly;
        plan.ffn = FFNMode::Skip;
      }
      break;
    case PolicyKind::FiRST:
      plan.routed = true;
      break;
  }
  return plan;
}

std::vector<uint8_t> simulate_ffn_skip(const SkipRule& rule, const float* scores, int tokens,
                                       int64_t first_decode_index) {
  const int layers = rule.num_layers;
  std::vector<uint8_t> skipped(static_cast<size_t>(tokens) * layers, 0);
  SkipState state;
  state.decode_index = first_decode_index;
  for (int t = 0; t < tokens; ++t) {
    begin_token(rule, state);
    for (int l = 0; l < layers; ++l) {
      const size_t i = static_cast<size_t>(t) * layers + l;
      if (adaptive_skip(rule, state, l)) {
        skipped[i] = 1;
      } else {
        record_score(state, scores[i]);
      }
    }
    end_token(state);
  }
  return skipped;
}

}  // namespace ffnskip
