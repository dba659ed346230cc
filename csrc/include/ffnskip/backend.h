// The operations a backend provides to the shared decode loop (Decoder::forward).
//
// The core owns the loop over layers and passes it to forward() as `layers`; the backend
// decides how to execute it: the CPU backend runs it directly, the CUDA backend can capture
// it once into a graph (so the layer operations must not depend on host-side values that
// change from token to token: the pass's position, token and skip state live in the
// backend's own, on CUDA device-resident, state).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "ffnskip/policy.h"

namespace ffnskip {

class Backend {
 public:
  virtual ~Backend() = default;

  using LayerLoop = std::function<void()>;

  // One pass over n tokens occupying positions [pos, pos + n): embeds them, calls `layers`
  // (which issues attention_block/ffn_block for every layer), then writes the logits of the
  // last token (vocab_size floats) to host memory. A decode step (n == 1) applies the
  // policy's decode plan, advances the skip state by one token and fills `record`; a prefill
  // pass (record == nullptr) applies the prefill plan.
  virtual void forward(const int32_t* tokens, int n, int pos, const LayerLoop& layers,
                       float* logits, StepRecord* record) = 0;

  // The sub-blocks of layer `layer` for the tokens of the current pass, as the plan says:
  // x += Attn(RMSNorm(x)) writing K/V (or only K/V, or nothing);
  // x += FFN(RMSNorm(x)) (or skipped, or gated by the skip rule on the backend).
  virtual void attention_block(int layer) = 0;
  virtual void ffn_block(int layer) = 0;

  // Applies to later passes; `policy` was validated. With compute_scores, decode steps
  // compute cos(a_l, x_{l+1}) for every layer whose FFN runs (the adaptive rule always does)
  // and cos(x_l, x_{l+1}) for every layer that is not dropped.
  virtual void set_policy(const SkipPolicy& policy, bool compute_scores) = 0;
  // The cache is emptied: decode tokens are counted from zero again (warm-up restarts) and
  // FiRST routes the next sequence afresh.
  virtual void reset_state() = 0;

  // The current sequence's FiRST routing: per layer 1 when the layer runs, and its router's
  // gate (NaN until a FiRST pass has routed it; every layer runs under other policies).
  virtual void sequence_layers(std::vector<uint8_t>& active, std::vector<float>& gate) const = 0;
  // KV cache allocated now; FiRST releases the cache of the layers a sequence skips.
  virtual int64_t kv_cache_bytes() const = 0;
};

}  // namespace ffnskip
