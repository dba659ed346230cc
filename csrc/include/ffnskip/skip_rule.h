// The skip rules, written once for both backends: plain structs and inline functions that
// compile as host code (CPU backend) and as device code (CUDA kernels read and update the
// same SkipState in device memory, so no decision needs the host).
// The rules are those of ../shared/docs/skip-methods.md.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FFNSKIP_HD __host__ __device__
#else
#define FFNSKIP_HD
#endif

namespace ffnskip {

enum class PolicyKind : int32_t {
  Dense = 0,
  FFNSkip = 1,     // FFN-SkipLLM: adaptive, cosine-saturation driven
  StaticFFN = 2,   // a fixed set of FFN blocks skipped on every decode token
  RandomFFN = 3,   // K random eligible FFN blocks per decode token (seeded)
  LayerDrop = 4,   // whole layers removed for every token, prefill included (no K/V)
  EarlyExit = 5,   // layers >= exit_layer skipped; their K/V come from the exit hidden state
  FiRST = 6,       // per-sequence layer routers decide at the first pass which layers run
};

// Scalar parameters of a policy (per-layer sets live in SkipPolicy::layers, see policy.h).
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

// Per-token state of the adaptive rule. On CUDA it lives in device memory.
struct SkipState {
  int64_t decode_index = 0;  // decode tokens since reset
  int32_t dense_token = 1;   // this token runs every FFN (warm-up, interleave)
  int32_t budget = 0;        // skips left in this token's run
  int32_t in_run = 0;        // a run of skips has started in this token
  float prev_score = 0.0f;   // score of the last layer whose FFN ran; NaN: none yet
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

// Start of a decode token for the adaptive rule.
FFNSKIP_HD inline void begin_token(const SkipRule& r, SkipState& s) {
  s.dense_token = is_dense_token(r, s.decode_index) ? 1 : 0;
  s.budget = r.max_skips;
  s.in_run = 0;
  s.prev_score = __builtin_nanf("");
}

FFNSKIP_HD inline void end_token(SkipState& s) { ++s.decode_index; }

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

// FiRST: the gate of layer l is sigmoid(w_l . m_l + b_l), m_l the mean over the prompt of the
// layer's input RMSNorm. It is compared in logit space (g >= t  <=>  logit >= log(t / (1 - t)))
// so host and device agree exactly on either side of t, whatever their expf rounds to.
FFNSKIP_HD inline bool router_keeps_layer(float router_logit, float threshold_logit) {
  return router_logit >= threshold_logit;
}

}  // namespace ffnskip
