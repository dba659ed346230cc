#include "ffnskip/decoder.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../cpu/cpu_backend.h"

namespace ffnskip {

namespace {

constexpr int kDefaultMaxSeqLenCap = 8192;

std::unique_ptr<Backend> make_backend(const ModelConfig& config, const ModelView& model,
                                      const DecoderOptions& options, int max_seq_len) {
  switch (options.device) {
    case Device::CPU:
      return make_cpu_backend(config, model, max_seq_len, options.num_threads);
    case Device::CUDA:
      throw std::invalid_argument(
          "device='cuda' is not available: this build of ffnskip_ext has no CUDA backend");
  }
  throw std::invalid_argument("unknown device");
}

}  // namespace

void check_token_id(int64_t token, int64_t index, int vocab_size) {
  if (token < 0 || token >= vocab_size) {
    throw std::invalid_argument("token id " + std::to_string(token) + " at index " +
                                std::to_string(index) + " is outside the vocabulary [0, " +
                                std::to_string(vocab_size) + ")");
  }
}

Decoder::Decoder(const ModelConfig& config, const WeightMap& weights,
                 const DecoderOptions& options)
    : config_(config), device_(options.device) {
  const ModelView model = collect_model_view(config_, weights);
  if (options.max_seq_len < 0) {
    throw std::invalid_argument("max_seq_len must be positive, got " +
                                std::to_string(options.max_seq_len));
  }
  if (options.num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0, got " +
                                std::to_string(options.num_threads));
  }
  max_seq_len_ = options.max_seq_len > 0
                     ? options.max_seq_len
                     : std::min(config_.max_position_embeddings, kDefaultMaxSeqLenCap);
  backend_ = make_backend(config_, model, options, max_seq_len_);
}

Decoder::~Decoder() = default;

int Decoder::position() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return position_;
}

void Decoder::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  position_ = 0;  // the cache is overwritten position by position; nothing else to clear
}

void Decoder::check_tokens(const int32_t* tokens, int n) const {
  if (n <= 0) throw std::invalid_argument("empty prompt: prefill needs at least one token");
  for (int i = 0; i < n; ++i) check_token_id(tokens[i], i, config_.vocab_size);
  if (static_cast<int64_t>(position_) + n > max_seq_len_) {
    throw std::invalid_argument("context overflow: " + std::to_string(n) +
                                " token(s) at position " + std::to_string(position_) +
                                " exceed max_seq_len " + std::to_string(max_seq_len_));
  }
}

void Decoder::prefill(const int32_t* tokens, int n, float* logits_out) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_tokens(tokens, n);
  forward(tokens, n, logits_out);
}

void Decoder::step(int32_t token, float* logits_out) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_tokens(&token, 1);
  forward(&token, 1, logits_out);
}

// The decode loop shared by every backend.
void Decoder::forward(const int32_t* tokens, int n, float* logits_out) {
  Backend& backend = *backend_;
  const int num_layers = config_.num_layers;
  backend.forward(tokens, n, position_, [&backend, num_layers] {
    for (int layer = 0; layer < num_layers; ++layer) {
      backend.attention_block(layer);
      backend.ffn_block(layer);
    }
  }, logits_out);
  position_ += n;
}

}  // namespace ffnskip
