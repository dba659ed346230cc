// A skip policy as the library's user describes it: the scalar rule plus per-layer sets,
// checked against the model. What each kind does exactly is docs/methods.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ffnskip {

enum class PolicyKind : int32_t {
  Dense = 0,
  FFNSkip = 1,     // FFN-SkipLLM: adaptive, cosine-saturation driven
  StaticFFN = 2,   // a fixed set of FFN blocks skipped on every decode token
  RandomFFN = 3,   // K random eligible FFN blocks per decode token (seeded)
  LayerDrop = 4,   // whole layers removed for every token, prefill included (no K/V)
  EarlyExit = 5,   // layers >= exit_layer skipped; their K/V come from the exit hidden state
  FiRST = 6,       // per-sequence layer routers decide at the first pass which layers run
  SubBlock = 7,    // chosen attention sub-blocks removed for every token (no K/V) and chosen
                   // FFN sub-blocks skipped on every decode token: a static draft
};

// The names of the kinds in policy files and the Python API ("dense", "ffn_skip", ...).
const std::vector<std::string>& policy_kind_names();
const char* policy_kind_name(PolicyKind kind);
PolicyKind parse_policy_kind(const std::string& name);  // throws std::invalid_argument

// Scalar parameters of a policy (per-layer sets live in SkipPolicy::layers).
struct SkipRule {
  PolicyKind kind = PolicyKind::Dense;
  int32_t num_layers = 0;
  float threshold = 0.95f;          // FFNSkip: skip needs prev_score > threshold;
                                    // FiRST: a layer runs when its gate >= threshold
  int32_t warmup_tokens = 32;       // FFNSkip: first decode tokens run dense
  int32_t full_token_interval = 6;  // FFNSkip: every n-th token after warm-up dense; 0: never
  int32_t max_skips = 0;            // FFNSkip: K, the longest run of skips; RandomFFN: K
  int32_t cold_start = 0;           // FFNSkip/RandomFFN: first layers never skipped
  int32_t cold_end = 0;             // FFNSkip/RandomFFN: last layers never skipped
  int32_t exit_layer = 0;           // EarlyExit: first skipped layer
  uint64_t seed = 0;                // RandomFFN
};

struct SkipPolicy {
  SkipRule rule;
  // StaticFFN, SubBlock: the FFN blocks skipped; LayerDrop: the layers dropped. Sorted, unique.
  std::vector<int32_t> layers;
  // SubBlock: the attention sub-blocks removed. Sorted, unique.
  std::vector<int32_t> attention_layers;
  // FiRST: one router per layer, weights [num_layers, hidden_size] row-major and biases.
  std::vector<float> router_weight;
  std::vector<float> router_bias;

  // Throws std::invalid_argument naming the offending field (and its value). num_layers 0
  // checks only what holds for any model (value ranges), as a policy made before a model
  // is known; hidden_size 0 skips the router shape check.
  void validate(int num_layers, int hidden_size = 0) const;
};

// FiRST routers average the first pass's input norm over at most this many tokens (the
// prompt's first prefill chunk on CUDA), on every backend.
constexpr int kRouterPromptTokens = 512;

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
  // while tracing, NaN otherwise and for layers that did not run.
  std::vector<float> layer_score;
};

}  // namespace ffnskip
