// The execution plan: a validated policy compiled once, in the core, into what every layer does
// in each kind of pass. Both backends execute it; they decide how to run a sub-block, never
// which. A pass is described explicitly (Pass), and every pass follows one story (forward()).
#pragma once

#include <cstdint>
#include <vector>

#include "ffnskip/decoder.h"
#include "ffnskip/policy.h"

namespace ffnskip {

enum class AttentionMode : uint8_t {
  Run,     // attention sub-block as usual
  Skip,    // nothing: no K/V written for this layer (layer drop)
  KVOnly,  // K/V written from the current hidden state, no attention output (early exit)
};

enum class FFNMode : uint8_t {
  Run,
  Skip,
  Adaptive,  // decided per token on the backend by adaptive_skip() (skip_rule.h)
  Random,    // decided per token on the backend by random_skip()
};

enum class PassKind : uint8_t {
  Prefill,  // n tokens appended; logits of the last
  Decode,   // one token appended under the decode plan; the step is recorded
};

// What one layer does in one kind of pass.
struct LayerPlan {
  AttentionMode attention = AttentionMode::Run;
  FFNMode ffn = FFNMode::Run;
  // FiRST: the layer runs only when its router kept it for the sequence; the pass that starts
  // the sequence routes it (Pass::routes).
  bool routed = false;
  bool ffn_score = false;    // cos(a_l, x_{l+1}) after the FFN: the adaptive rule or a trace
  bool layer_score = false;  // cos(x_l, x_{l+1}) of the whole layer: a trace
};

struct ExecutionPlan {
  SkipRule rule;  // the scalars of the per-token decisions (Adaptive, Random)
  std::vector<LayerPlan> prefill, decode;
  // FiRST: the routers and the threshold in logit space (router_keeps_layer).
  std::vector<float> router_weight, router_bias;
  float threshold_logit = 0.0f;
  // A decode step's record before its per-token decisions: the FFNs and attention the plan
  // itself skips, NaN scores.
  StepRecord decode_record;

  int num_layers() const { return static_cast<int>(decode.size()); }
  const std::vector<LayerPlan>& layers(PassKind kind) const {
    return kind == PassKind::Decode ? decode : prefill;
  }
  bool routes_sequences() const { return rule.kind == PolicyKind::FiRST; }
};

// `policy` was validated. With trace_scores, decode steps compute both scores of every layer
// that runs (the adaptive rule computes the FFN score anyway).
ExecutionPlan compile_plan(const SkipPolicy& policy, bool trace_scores);

// log(t / (1 - t)) for a FiRST threshold t in [0, 1] (+-infinity at the ends).
float router_threshold_logit(float threshold);

struct Pass {
  PassKind kind = PassKind::Prefill;
  const int32_t* tokens = nullptr;
  int n = 0;
  int pos = 0;               // position of tokens[0]
  int64_t decode_index = 0;  // decode steps since the generation began (warm-up, random keys)
  bool routes = false;       // FiRST: this pass starts the sequence and routes every layer
  StepRecord* record = nullptr;  // decode: filled with what the step did
  float* logits = nullptr;       // host: the logits of the last token (vocab_size floats)
  const InterruptCheck* interrupted = nullptr;  // asked before each sub-block (CPU prefill)
};

inline void throw_if_interrupted(const Pass& pass) {
  if (pass.interrupted != nullptr && (*pass.interrupted)()) throw Interrupted();
}

// The story of every pass, whichever backend runs it: open the pass (embedding; a decode step
// also begins its token for the rule), each layer's attention and FFN sub-blocks as the plan
// says, then the logits of the last token. `Executor` is a backend.
template <typename Executor>
void forward(Executor& executor, const Pass& pass, const ExecutionPlan& plan) {
  executor.begin_pass(pass);
  const std::vector<LayerPlan>& layers = plan.layers(pass.kind);
  for (int layer = 0; layer < static_cast<int>(layers.size()); ++layer) {
    throw_if_interrupted(pass);
    executor.attention_block(pass, layer, layers[layer]);
    throw_if_interrupted(pass);
    executor.ffn_block(pass, layer, layers[layer]);
  }
  executor.end_pass(pass);
}

}  // namespace ffnskip
