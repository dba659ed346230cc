// The skip rule on the device, so that a decode step (captured once as a graph) decides every
// gated FFN without the host. The rule itself is core/skip_rule.h.
//
// The decision for FFN `layer` is taken by thread 0 of the FFN's RMSNorm kernel (one block in a
// decode step, see launch_gated_rmsnorm), which writes a per-layer flag; the FFN's other kernels
// read the flag first and return at once when it is set, so a skipped FFN reads none of its
// weights and the gating adds no kernel of its own.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/skip_rule.h"
#include "common.cuh"

namespace ffnskip::cuda {

struct FfnGate {
  SkipRule rule;
  FFNMode mode = FFNMode::Adaptive;  // Adaptive or Random
  SkipState* state = nullptr;
  const int32_t* decode_index = nullptr;  // device: the step's decode index (pass input)
  int layer = 0;
  int32_t* skip_flag = nullptr;    // this layer's flag
  uint8_t* ffn_skipped = nullptr;  // the step record's [layers] arrays
  float* score = nullptr;
};

// Decides FFN g.layer of this decode step (one thread): writes the flag and the record's
// ffn_skipped[layer], and resets score[layer] to NaN (the score kernel overwrites it when the
// FFN runs). Returns true when the FFN is skipped.
__device__ __forceinline__ bool decide_ffn(const FfnGate& g) {
  const bool skip = rule_skips_ffn(g.mode, g.rule, *g.state, *g.decode_index, g.layer);
  *g.skip_flag = skip ? 1 : 0;
  g.ffn_skipped[g.layer] = skip ? 1 : 0;
  g.score[g.layer] = quiet_nan();
  return skip;
}

// The start of a decode step's token (begin_token), taken by thread 0 of the step's first
// kernel (the embedding lookup) rather than by a launch of its own. state null: no step.
struct TokenStart {
  SkipRule rule;
  SkipState* state = nullptr;
  const int32_t* decode_index = nullptr;  // device: the step's decode index (pass input)
};

__device__ __forceinline__ void start_token(const TokenStart& s) {
  if (s.state != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    begin_token(s.rule, *s.state, *s.decode_index);
  }
}

}  // namespace ffnskip::cuda
