// The execution plan: a validated policy compiled once, in the core, into what every layer does
// in each kind of pass. Both backends execute it; they decide how to run a sub-block, never
// which. A pass is described explicitly (Pass), and every pass follows one story (forward()).
#pragma once

#include <algorithm>
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
  Prefill,  // n tokens appended under the prefill plan; logits of the last
  Decode,   // one token appended under the decode plan; the step is recorded
  Draft,    // a decode step under the draft policy's plan (speculative decoding); recorded
  Verify,   // n tokens appended at once under the verify plan; logits of every one
};

// One token under a decode plan (of the policy or the draft), with a record.
inline bool is_step(PassKind kind) { return kind == PassKind::Decode || kind == PassKind::Draft; }

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
  // verify: the decode plan for many tokens at once, without scores; empty when a decode step
  // decides per token (adaptive or random FFNs) or writes K/V only (early exit).
  std::vector<LayerPlan> prefill, decode, verify;
  // FiRST: the routers and the threshold in logit space (router_keeps_layer).
  std::vector<float> router_weight, router_bias;
  float threshold_logit = 0.0f;
  // A decode step's record before its per-token decisions: the FFNs and attention the plan
  // itself skips, NaN scores.
  StepRecord decode_record;

  int num_layers() const { return static_cast<int>(decode.size()); }
  const std::vector<LayerPlan>& layers(PassKind kind) const {
    switch (kind) {
      case PassKind::Prefill: return prefill;
      case PassKind::Verify: return verify;
      default: return decode;
    }
  }
  bool verifies() const { return !verify.empty(); }
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
  // FiRST: this pass starts the sequence and routes every layer it runs, for the policy or,
  // when the draft policy is FiRST, for the draft steps (the pass itself then runs every layer).
  bool routes = false;
  StepRecord* record = nullptr;  // decode and draft steps: filled with what the step did
  // host: the logits of the last token (vocab_size floats); of every token for Verify
  // (n * vocab_size).
  float* logits = nullptr;
  const InterruptCheck* interrupted = nullptr;  // asked before each sub-block (CPU prefill)
};

// The plans a backend holds: the policy's (prefill, decode and verify passes) and the draft
// policy's (draft steps). Both stay compiled, so alternating draft and verify passes costs
// nothing. At most one of them routes sequences (the decoder refuses two FiRST policies).
struct PlanPair {
  ExecutionPlan target, draft;

  const ExecutionPlan& of(PassKind kind) const {
    return kind == PassKind::Draft ? draft : target;
  }
  // The FiRST plan whose routers decide the sequence, when one routes.
  const ExecutionPlan& routing() const { return target.routes_sequences() ? target : draft; }
};

// A pass as consecutive chunks of at most `most` tokens, in order: run_chunk(chunk, done) with
// `done` tokens of the pass before the chunk; FiRST routes on the first chunk only. The backend
// sets each chunk's logits.
template <typename RunChunk>
void for_each_chunk(const Pass& pass, int most, RunChunk&& run_chunk) {
  Pass chunk = pass;
  for (int done = 0; done < pass.n; done += chunk.n) {
    chunk.n = std::min(most, pass.n - done);
    chunk.tokens = pass.tokens + done;
    chunk.pos = pass.pos + done;
    chunk.routes = pass.routes && done == 0;
    run_chunk(chunk, done);
  }
}

inline void throw_if_interrupted(const Pass& pass) {
  if (pass.interrupted != nullptr && (*pass.interrupted)()) throw Interrupted();
}

// The story of every pass, whichever backend runs it: open the pass (embedding; a decode step
// also begins its token for the rule), each layer's attention and FFN sub-blocks as the plan
// says, then the logits of the last token (of every token for Verify). `Executor` is a
// backend; `plan` is the one pass.kind runs (PlanPair::of).
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
