// The operations a backend provides to the shared decode loop (Decoder::forward).
// Each call works on the activations of the tokens of the current forward pass; a backend may
// run them immediately (CPU) or enqueue them on a stream (CUDA).
#pragma once

#include <cstdint>

namespace ffnskip {

class Backend {
 public:
  virtual ~Backend() = default;

  // Loads the token embeddings of n tokens that will occupy positions [pos, pos + n).
  virtual void embed(const int32_t* tokens, int n, int pos) = 0;
  // x += Attn(RMSNorm(x)) for layer `layer`; writes that layer's K/V at [pos, pos + n).
  virtual void attention_block(int layer, int n, int pos) = 0;
  // x += FFN(RMSNorm(x)) for layer `layer`.
  virtual void ffn_block(int layer, int n) = 0;
  // Final norm and LM head of the last of the n tokens; writes vocab_size floats to host memory.
  virtual void logits(int n, float* out) = 0;
};

}  // namespace ffnskip
