#include "ffnskip/policy.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "skip_rule.h"

namespace ffnskip {

namespace {

// In PolicyKind order.
const std::vector<std::string> kKindNames = {"dense",      "ffn_skip",   "static_ffn",
                                             "random_ffn", "layer_drop", "early_exit",
                                             "first",      "sub_block"};

void require(bool ok, const std::string& field, const std::string& why) {
  if (!ok) throw std::invalid_argument("invalid policy: " + field + " " + why);
}

// Numbers formatted without iostreams: to_chars ignores the locale (a message never reads
// "0,5") and stays out of std::locale, which the H200 check of 2026-12-04 points at: pytest
// processes that had imported a PyTorch CUDA wheel crashed (SIGSEGV) in the first policy check
// that formatted a number with an ostringstream.
template <typename T>
std::string got(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    char text[32];
    const auto end = std::to_chars(text, text + sizeof(text), value).ptr;
    return ", got " + std::string(text, end);
  } else {
    return ", got " + std::to_string(value);
  }
}

void require_at_least(int value, int minimum, const std::string& field) {
  require(value >= minimum, field, "must be >= " + std::to_string(minimum) + got(value));
}

// Layer indices of the model (any index >= 0 without one), sorted and unique.
void require_layer_set(const std::vector<int32_t>& layers, int num_layers,
                       const std::string& field) {
  const bool model = num_layers > 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    require(layers[i] >= 0 && (!model || layers[i] < num_layers), field,
            "names layer " + std::to_string(layers[i]) +
                (model ? ", the model has layers 0.." + std::to_string(num_layers - 1)
                       : ", layers are numbered from 0"));
    require(i == 0 || layers[i] != layers[i - 1], field,
            "has duplicates (layer " + std::to_string(layers[i]) + ")");
    require(i == 0 || layers[i] > layers[i - 1], field, "must be sorted");
  }
}

}  // namespace

const std::vector<std::string>& policy_kind_names() { return kKindNames; }

const char* policy_kind_name(PolicyKind kind) {
  const size_t index = static_cast<size_t>(kind);
  return index < kKindNames.size() ? kKindNames[index].c_str() : "unknown";
}

PolicyKind parse_policy_kind(const std::string& name) {
  const auto it = std::find(kKindNames.begin(), kKindNames.end(), name);
  if (it == kKindNames.end()) throw std::invalid_argument("unknown policy kind '" + name + "'");
  return static_cast<PolicyKind>(it - kKindNames.begin());
}

void SkipPolicy::validate(int num_layers, int hidden_size) const {
  const SkipRule& r = rule;
  const bool model = num_layers > 0;
  const std::string n = std::to_string(num_layers);
  if (model) {
    require(r.num_layers == num_layers, "num_layers",
            "is " + std::to_string(r.num_layers) + ", the model has " + n);
  }
  require_layer_set(layers, num_layers, "layers");
  require(attention_layers.empty() || r.kind == PolicyKind::SubBlock, "attention_layers",
          "are only for sub_block policies");
  require_layer_set(attention_layers, num_layers, "attention_layers");
  switch (r.kind) {
    case PolicyKind::Dense:
      break;
    case PolicyKind::FFNSkip:
      require(std::isfinite(r.threshold) && r.threshold >= -1.0f && r.threshold <= 1.0f,
              "threshold", "must be in [-1, 1]" + got(r.threshold));
      require_at_least(r.warmup_tokens, 0, "warmup_tokens");
      require_at_least(r.full_token_interval, 0, "full_token_interval");
      require_at_least(r.max_skips, 0, "max_skips_per_token");
      [[fallthrough]];
    case PolicyKind::RandomFFN:
      require_at_least(r.cold_start, 0, "cold_start");
      require_at_least(r.cold_end, 0, "cold_end");
      require_at_least(r.max_skips, 0, "k");
      if (model) {
        require(r.cold_start + r.cold_end < num_layers, "cold_start + cold_end",
                "cover every layer (" + std::to_string(r.cold_start + r.cold_end) + " of " + n +
                    ")");
      }
      break;
    case PolicyKind::StaticFFN:
    case PolicyKind::SubBlock:
      break;
    case PolicyKind::LayerDrop:
      if (model) {
        require(static_cast<int>(layers.size()) < num_layers, "layers", "would drop every layer");
      }
      break;
    case PolicyKind::EarlyExit:
      require(r.exit_layer >= 1 && (!model || r.exit_layer <= num_layers), "exit_layer",
              "must be in [1, " + (model ? n : std::string("num_layers")) + "]" +
                  got(r.exit_layer));
      break;
    case PolicyKind::FiRST: {
      require(std::isfinite(r.threshold) && r.threshold >= 0.0f && r.threshold <= 1.0f,
              "threshold", "must be in [0, 1]" + got(r.threshold));
      if (model) {
        require(router_bias.size() == static_cast<size_t>(num_layers), "routers",
                "have " + std::to_string(router_bias.size()) + " biases, the model has " + n +
                    " layers");
      }
      if (model && hidden_size > 0) {
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
}

std::vector<uint8_t> simulate_ffn_skip(const SkipRule& rule, const float* scores, int tokens,
                                       int64_t first_decode_index) {
  const int layers = rule.num_layers;
  std::vector<uint8_t> skipped(static_cast<size_t>(tokens) * layers, 0);
  SkipState state;
  for (int t = 0; t < tokens; ++t) {
    begin_token(rule, state, first_decode_index + t);
    for (int l = 0; l < layers; ++l) {
      const size_t i = static_cast<size_t>(t) * layers + l;
      if (adaptive_skip(rule, state, l)) {
        skipped[i] = 1;
      } else {
        record_score(state, scores[i]);
      }
    }
  }
  return skipped;
}

}  // namespace ffnskip
