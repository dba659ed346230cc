// FiRST on the device: the pass that starts a sequence routes every layer (router_keeps_layer of
// core/skip_rule.h) and writes a per-layer flag; the layer's kernels read the flag, as they
// read the FFN skip flag (ffn_gate.cuh), so neither the decision nor the skip needs the host.
// Prefill linears run on cuBLAS, which cannot read a flag: a routed layer's output projections
// write a delta that a gated kernel adds to the residual stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffnskip::cuda {

// The router reads the mean over the tokens of the layer's input norm in fp32, as the CPU
// backend does: it normalises the fp32 rows itself (the norm kernel's output is rounded to the
// storage type), adds them in token order and divides by n.
struct RouteArgs {
  const float* x = nullptr;            // [n, hidden]: the layer's input (residual stream)
  const float* norm_weight = nullptr;  // [hidden]: the layer's input RMSNorm
  float eps = 0.0f;
  int n = 0;                           // tokens averaged over, 1..kRouterPromptTokens
  int hidden = 0;
  const float* weight = nullptr;   // [hidden]: this layer's router
  const float* bias = nullptr;     // this layer's bias
  float threshold_logit = 0.0f;
  int32_t* layer_off = nullptr;    // this layer's flag: 1 when the sequence skips it
  float* gate = nullptr;           // this layer's gate, for stats
};

// Throws std::invalid_argument when n is outside 1..kRouterPromptTokens.
void launch_route_layer(const RouteArgs& args, cudaStream_t stream);

// x[i] += delta[i] for i < count, unless *skip_flag is set.
void launch_gated_residual_add(float* x, const float* delta, int64_t count,
                               const int32_t* skip_flag, cudaStream_t stream);

}  // namespace ffnskip::cuda
