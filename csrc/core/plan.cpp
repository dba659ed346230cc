#include "plan.h"

#include <algorithm>
#include <cmath>

namespace ffnskip {

namespace {

bool contains(const std::vector<int32_t>& sorted, int layer) {
  return std::binary_search(sorted.begin(), sorted.end(), layer);
}

// What `layer` does in a prefill pass (decode = false) or a decode step (decode = true).
// Prefill never skips, except removed attention sub-blocks (layer drop, sub-block skip), which
// do not exist for any token (no K/V to attend to later), and FiRST, whose decisions hold for
// the prompt too.
LayerPlan plan_layer(const SkipPolicy& policy, int layer, bool decode, bool trace_scores) {
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
    case PolicyKind::SubBlock:  // attention as layer drop does it, FFNs as static skip
      if (contains(policy.attention_layers, layer)) plan.attention = AttentionMode::Skip;
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
  if (decode) {
    const bool layer_runs = plan.attention != AttentionMode::Skip;
    plan.ffn_score = plan.ffn != FFNMode::Skip &&
                     (trace_scores || plan.ffn == FFNMode::Adaptive);
    plan.layer_score = trace_scores && layer_runs;
  }
  return plan;
}

}  // namespace

float router_threshold_logit(float threshold) {
  if (threshold <= 0.0f) return -INFINITY;
  if (threshold >= 1.0f) return INFINITY;
  return std::log(threshold / (1.0f - threshold));
}

ExecutionPlan compile_plan(const SkipPolicy& policy, bool trace_scores) {
  ExecutionPlan plan;
  plan.rule = policy.rule;
  const int layers = policy.rule.num_layers;
  for (int l = 0; l < layers; ++l) {
    plan.prefill.push_back(plan_layer(policy, l, false, trace_scores));
    plan.decode.push_back(plan_layer(policy, l, true, trace_scores));
  }
  const bool per_token = std::any_of(plan.decode.begin(), plan.decode.end(), [](const LayerPlan& l) {
    return l.ffn == FFNMode::Adaptive || l.ffn == FFNMode::Random ||
           l.attention == AttentionMode::KVOnly;
  });
  if (!per_token) {
    plan.verify = plan.decode;
    for (LayerPlan& l : plan.verify) l.ffn_score = l.layer_score = false;
  }
  if (plan.routes_sequences()) {
    plan.router_weight = policy.router_weight;
    plan.router_bias = policy.router_bias;
  }
  plan.threshold_logit = router_threshold_logit(policy.rule.threshold);
  StepRecord& record = plan.decode_record;
  const size_t count = static_cast<size_t>(layers);
  record.ffn_skipped.assign(count, 0);
  record.layer_skipped.assign(count, 0);
  record.score.assign(count, NAN);
  record.layer_score.assign(count, NAN);
  for (int l = 0; l < layers; ++l) {
    record.ffn_skipped[l] = plan.decode[l].ffn == FFNMode::Skip ? 1 : 0;
    record.layer_skipped[l] = plan.decode[l].attention != AttentionMode::Run ? 1 : 0;
  }
  return plan;
}

}  // namespace ffnskip
