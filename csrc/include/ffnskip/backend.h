// The operations a backend provides to the shared decode loop (Decoder::forward).
//
// The core owns the loop over layers and passes it to forward() as `layers`; the backend
// decides how to execute it: the CPU backend runs it directly, the CUDA backend can capture
// it once into a graph (so the layer operations must not depend on host-side values that
// change from token to token: the pass's position and token live in the backend's state).
#pragma once

#include <cstdint>
#include <functional>

namespace ffnskip {

class Backend {
 public:
  virtual ~Backend() = default;

  using LayerLoop = std::function<void()>;

  // One pass over n tokens occupying positions [pos, pos + n): embeds them, calls `layers`
  // (which issues attention_block/ffn_block for every layer), then writes the logits of the
  // last token (vocab_size floats) to host memory.
  virtual void forward(const int32_t* tokens, int n, int pos, const LayerLoop& layers,
                       float* logits) = 0;

  // x += Attn(RMSNorm(x)) for the tokens of the current pass; writes their K/V.
  virtual void attention_block(int layer) = 0;
  // x += FFN(RMSNorm(x)) for the tokens of the current pass.
  virtual void ffn_block(int layer) = 0;
};

}  // namespace ffnskip
