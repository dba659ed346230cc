// The decoder: one model, one KV cache, one backend. Inputs are checked before any work, so a
// rejected call leaves the cache and position as they were.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ffnskip/backend.h"
#include "ffnskip/config.h"
#include "ffnskip/weights.h"

namespace ffnskip {

enum class Device { CPU, CUDA };

// Throws std::invalid_argument unless 0 <= token < vocab_size; `index` is its place in the input.
void check_token_id(int64_t token, int64_t index, int vocab_size);

struct DecoderOptions {
  Device device = Device::CPU;
  int max_seq_len = 0;   // 0: min(max_position_embeddings, 8192)
  int num_threads = 0;   // CPU worker threads including the caller; 0: all hardware threads
};

class Decoder {
 public:
  // Copies the weights into the backend; `weights` may be freed afterwards.
  Decoder(const ModelConfig& config, const WeightMap& weights, const DecoderOptions& options);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  const ModelConfig& config() const { return config_; }
  int max_seq_len() const { return max_seq_len_; }
  int position() const;
  Device device() const { return device_; }

  void reset();
  // Appends the prompt to the cache; writes the logits of its last token (vocab_size floats).
  void prefill(const int32_t* tokens, int n, float* logits_out);
  // Appends one token; writes its logits.
  void step(int32_t token, float* logits_out);

 private:
  void check_tokens(const int32_t* tokens, int n) const;
  void forward(const int32_t* tokens, int n, float* logits_out);

  ModelConfig config_;
  Device device_;
  int max_seq_len_ = 0;
  int position_ = 0;
  std::unique_ptr<Backend> backend_;
  // Serialises calls: one Decoder used from several threads never interleaves two passes.
  mutable std::mutex mutex_;
};

}  // namespace ffnskip
