// The per-token skip rules, written once for both backends: inline functions that compile as
// host code (CPU backend) and as device code (CUDA kernels read and update the same SkipState
// in device memory, so no decision needs the host). docs/methods.md describes them.
#pragma once

#include <cstdint>

#include "ffnskip/policy.h"
#include "plan.h"

#if defined(__CUDACC__)
#define FFNSKIP_HD __host__ __device__
#else
#define FFNSKIP_HD
#endif

namespace ffnskip {

// Per-token state of the adaptive rule. On CUDA it lives in device memory.
struct SkipState {
  int32_t dense_token = 1;  // this token runs every FFN (warm-up, interleave)
  int32_t budget = 0;       // skips left in this token's run
  int32_t in_run = 0;       // a run of skips has started in this token
  float prev_score = 0.0f;  // score of the last layer whose FFN ran; NaN: none yet
};

FFNSKIP_HD inline bool ffn_eligible(const SkipRule& r, int layer) {
  return layer >= r.cold_start && layer < r.num_layers - r.cold_end;
}

// Warm-up tokens, then every full_token_interval-th token (pattern K,K,K,K,K,0 for 6).
FFNSKIP_HD inline bool is_dense_token(const SkipRule& r, int64_t decode_index) {
  if (decode_index < r.warmup_tokens) return true;
  if (r.full_token_interval <= 0) return false;
  return (decode_index - r.warmup_tokens + 1) % r.full_token_interval == 0;
}

// Start of decode token `decode_index` (decode steps since the sequence began).
FFNSKIP_HD inline void begin_token(const SkipRule& r, SkipState& s, int64_t decode_index) {
  s.dense_token = is_dense_token(r, decode_index) ? 1 : 0;
  s.budget = r.max_skips;
  s.in_run = 0;
  s.prev_score = __builtin_nanf("");
}

// FFN-SkipLLM: the previous computed layer's score decides; one contiguous run of at most
// K skips per token. Returns true when FFN `layer` is skipped; updates the budget.
FFNSKIP_HD inline bool adaptive_skip(const SkipRule& r, SkipState& s, int layer) {
  if (!s.dense_token && ffn_eligible(r, layer) && s.budget > 0 && s.prev_score > r.threshold) {
    --s.budget;
    s.in_run = 1;
    return true;
  }
  if (s.in_run) s.budget = 0;  // the run is over: no second run in this token
  return false;
}

// Called after FFN `layer` ran, with cos(a_l, x_{l+1}).
FFNSKIP_HD inline void record_score(SkipState& s, float score) {
  s.prev_score = score > 1.0f ? 1.0f : (score < -1.0f ? -1.0f : score);
}

// Cosine from the three sums a.b, a.a, b.b (fp32), 0 when either vector is zero.
FFNSKIP_HD inline float cosine_from_sums(float ab, float aa, float bb) {
  const float denom = aa * bb;
  return denom > 0.0f ? ab / __builtin_sqrtf(denom) : 0.0f;
}

// A counter-based hash (splitmix64 finaliser): the same bits on host and device.
FFNSKIP_HD inline uint64_t mix_hash(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

FFNSKIP_HD inline uint64_t random_key(const SkipRule& r, int64_t decode_index, int layer) {
  return mix_hash(r.seed ^ mix_hash(static_cast<uint64_t>(decode_index) * 1024u + layer));
}

// Random FFN skip: the K eligible layers with the smallest keys for this token are skipped.
FFNSKIP_HD inline bool random_skip(const SkipRule& r, int64_t decode_index, int layer) {
  if (!ffn_eligible(r, layer)) return false;
  const uint64_t key = random_key(r, decode_index, layer);
  int rank = 0;
  for (int j = r.cold_start; j < r.num_layers - r.cold_end; ++j) {
    const uint64_t other = random_key(r, decode_index, j);
    rank += (other < key || (other == key && j < layer)) ? 1 : 0;
  }
  return rank < r.max_skips;
}

// Whether FFN `layer` of decode token `decode_index` is skipped under `mode`: the plan's own
// decision (Run, Skip) or the rule's for this token (Adaptive, Random).
FFNSKIP_HD inline bool rule_skips_ffn(FFNMode mode, const SkipRule& r, SkipState& s,
                                   int64_t decode_index, int layer) {
  switch (mode) {
    case FFNMode::Run: return false;
    case FFNMode::Skip: return true;
    case FFNMode::Adaptive: return adaptive_skip(r, s, layer);
    case FFNMode::Random: return random_skip(r, decode_index, layer);
  }
  return false;
}

// FiRST: the gate of layer l is sigmoid(w_l . m_l + b_l), m_l the mean over the prompt of the
// layer's input RMSNorm. It is compared in logit space (g >= t  <=>  logit >= log(t / (1 - t)))
// so host and device agree exactly on either side of t, whatever their expf rounds to.
FFNSKIP_HD inline bool router_keeps_layer(float router_logit, float threshold_logit) {
  return router_logit >= threshold_logit;
}

}  // namespace ffnskip
