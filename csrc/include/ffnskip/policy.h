// A skip policy as the host describes it: the scalar rule plus per-layer sets, checked against
// the model, and the static per-layer plan both backends derive from it.
#pragma once

#include <cstdint>
#include <vector>

#include "ffnskip/skip_rule.h"

namespace ffnskip {

struct SkipPolicy {
  SkipRule rule;
  // StaticFFN: the FFN blocks skipped; LayerDrop: the layers dropped. Sorted, unique.
  std::vector<int32_t> layers;
  // FiRST: one router per layer, weights [num_layers, hidden_size] row-major and biases.
  std::vector<float> router_weight;
  std::vector<float> router_bias;

  // Throws std::invalid_argument naming the offending field. hidden_size 0 skips the router
  // shape check (for rules checked without a model).
  void validate(int num_layers, int hidden_size = 0) const;
};

// FiRST routers average the first pass's input norm over at most this many tokens (the
// prompt's first prefill chunk on CUDA), on every backend.
constexpr int kRouterPromptTokens = 512;

// log(t / (1 - t)) for a FiRST threshold t in [0, 1] (+-infinity at the ends).
float router_threshold_logit(float threshold);

enum class AttentionMode : uint8_t {
  Run,     // attention sub-block as usual
  Skip,    // nothing: no K/V written for this layer (layer drop)
  KVOnly,  // K/V written from the current hidden state, no attention output (early exit)
};

enum class FFNMode : uint8_t {
  Run,
  Skip,
  Adaptive,  // decided per token on the backend by adaptive_skip()
  Random,    // decided per token on the backend by random_skip()
};

struct LayerPlan {
  AttentionMode attention = AttentionMode::Run;
  FFNMode ffn = FFNMode::Run;
  // FiRST: the whole layer runs or not as its router decided for the current sequence; the
  // pass that starts the sequence (position 0) routes it.
  bool routed = false;
};

// What `layer` does in a prefill pass (decode = false) or a decode step (decode = true).
// Prefill never skips, except layer drop, whose layers do not exist for any token, and FiRST,
// whose decisions hold for the prompt too.
LayerPlan plan_layer(const SkipPolicy& policy, int layer, bool decode);

// The FFN-SkipLLM decisions for `tokens` decode steps given every layer's score
// (scores[t * num_layers + l]; the score of a layer the rule skips is ignored, as a skipped
// FFN has none), starting at decode index `first_decode_index`. Returns skipped flags in the
// same layout. Used to screen calibration candidates on dense traces and to test the rule.
std::vector<uint8_t> simulate_ffn_skip(const SkipRule& rule, const float* scores, int tokens,
                                       int64_t first_decode_index = 0);

// One decode step as the backend ran it, for stats and traces (num_layers entries each).
struct StepRecord {
  std::vector<uint8_t> ffn_skipped;
  std::vector<uint8_t> layer_skipped;  // attention skipped or reduced to K/V only
  std::vector<float> score;            // cos(a_l, x_{l+1}); NaN where not computed
  // cos(x_l, x_{l+1}) of the whole layer (Block Influence is 1 - its mean); computed only
  // with compute_scores, NaN otherwise and for dropped layers.
  std::vector<float> layer_score;
};

}  // namespace ffnskip
