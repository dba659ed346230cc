// FiRST on the device: the pass that starts a sequence routes every layer (router_keeps_layer of
// core/skip_rule.h) and writes a per-layer flag; the layer's kernels read the flag, as they
// read the FFN skip flag (ffn_gate.cuh), so a decode step needs the host for neither the
// decision nor the skip. Multi-token passes (cuBLAS, which cannot read a flag) read each flag
// back as the routing pass writes it and launch nothing for a layer routed off.
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

}  // namespace ffnskip::cuda
