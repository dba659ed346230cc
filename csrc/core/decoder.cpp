#include "ffnskip/decoder.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../cpu/cpu_backend.h"
#include "backend.h"
#include "cuda_loader.h"
#include "model_view.h"
#include "plan.h"

namespace ffnskip {

namespace {

constexpr int kDefaultMaxSeqLenCap = 8192;

std::unique_ptr<Backend> make_backend(const ModelConfig& config, const ModelView& model,
                                      const DecoderOptions& options, int max_seq_len) {
  switch (options.device) {
    case Device::CPU:
      return make_cpu_backend(config, model, max_seq_len, options.num_threads, options.dtype,
                              options.kv_cache_dtype);
    case Device::CUDA:
      return load_cuda_backend(config, model, max_seq_len, options.dtype);
  }
  throw std::invalid_argument("unknown device");
}

SkipPolicy dense_policy(int num_layers) {
  SkipPolicy policy;
  policy.rule.num_layers = num_layers;
  return policy;
}

// Whose FiRST routers decide a sequence's layers: the policy's, the draft's, or nobody's.
enum class RoutingOwner { None, Policy, Draft };

RoutingOwner routing_owner(const SkipPolicy& policy, const SkipPolicy& draft) {
  if (policy.rule.kind == PolicyKind::FiRST) return RoutingOwner::Policy;
  if (draft.rule.kind == PolicyKind::FiRST) return RoutingOwner::Draft;
  return RoutingOwner::None;
}

// Per layer: 1 where the plan removes the attention sub-block for every token (no K/V).
std::vector<uint8_t> removed_attention_layers(const ExecutionPlan& plan) {
  std::vector<uint8_t> removed(plan.decode.size(), 0);
  for (size_t l = 0; l < removed.size(); ++l) {
    removed[l] = plan.decode[l].attention == AttentionMode::Skip ? 1 : 0;
  }
  return removed;
}

// A FiRST draft routes on the policy's passes, which must run (and cache) every layer:
// `attention_removed` is the policy's plan's (removed_attention_layers).
void check_draft_routing(PolicyKind kind, const std::vector<uint8_t>& attention_removed,
                         const SkipPolicy& draft) {
  if (draft.rule.kind != PolicyKind::FiRST) return;
  const bool removes = std::find(attention_removed.begin(), attention_removed.end(), 1) !=
                       attention_removed.end();
  if (kind == PolicyKind::FiRST || removes) {
    throw std::invalid_argument(std::string("a FiRST draft policy needs a policy that runs every "
                                            "layer in a prefill; the policy is ") +
                                policy_kind_name(kind));
  }
}

}  // namespace

const std::vector<std::string>& device_names() {
  static const std::vector<std::string> names = {"cpu", "cuda"};  // in Device order
  return names;
}

Device parse_device(const std::string& name) {
  const std::vector<std::string>& names = device_names();
  const auto it = std::find(names.begin(), names.end(), name);
  if (it == names.end()) {
    throw std::invalid_argument("unknown device '" + name + "' (expected 'cpu' or 'cuda')");
  }
  return static_cast<Device>(it - names.begin());
}

const std::vector<std::string>& dtype_names() {
  static const std::vector<std::string> names = {"auto", "float32", "float16", "bfloat16"};
  return names;
}

DType parse_dtype(const std::string& name) {
  if (name == "auto") return DType::Auto;
  if (name == "float32" || name == "fp32") return DType::F32;
  if (name == "float16" || name == "fp16") return DType::F16;
  if (name == "bfloat16" || name == "bf16") return DType::BF16;
  throw std::invalid_argument("unknown dtype '" + name + "' (auto, float32, float16 or bfloat16)");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Auto: return "auto";
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown";
}

void check_token_id(int64_t token, int64_t index, int vocab_size) {
  if (token < 0 || token >= vocab_size) {
    throw std::invalid_argument("token id " + std::to_string(token) + " at index " +
                                std::to_string(index) + " is outside the vocabulary [0, " +
                                std::to_string(vocab_size) + ")");
  }
}

Decoder::Decoder(const ModelConfig& config, const WeightMap& weights,
                 const DecoderOptions& options)
    : config_(config), device_(options.device), dtype_(options.dtype) {
  const ModelView model = collect_model_view(config_, weights);
  if (options.max_seq_len < 0) {
    throw std::invalid_argument("max_seq_len must be positive, got " +
                                std::to_string(options.max_seq_len));
  }
  if (options.num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0, got " +
                                std::to_string(options.num_threads));
  }
  if (options.kv_cache_dtype != DType::Auto) {
    const std::string got = std::string(", got ") + dtype_name(options.kv_cache_dtype);
    if (options.device == Device::CUDA) {
      throw std::invalid_argument(
          "kv_cache_dtype: the CUDA backend holds its KV cache in the activation dtype; give "
          "\"auto\"" + got);
    }
    if (options.kv_cache_dtype == DType::BF16) {
      throw std::invalid_argument("kv_cache_dtype on the CPU: auto, float32 or float16" + got);
    }
  }
  max_seq_len_ = options.max_seq_len > 0
                     ? options.max_seq_len
                     : std::min(config_.max_position_embeddings, kDefaultMaxSeqLenCap);
  backend_ = make_backend(config_, model, options, max_seq_len_);
  footprint_ = backend_->weight_footprint();
  for (const TensorSpec& spec : model_tensors(config_)) {
    if (spec.shape.size() != 2) continue;  // vectors are fp32 on every backend
    const TensorType stored = weights.at(spec.name).type;
    const TensorType held = backend_->held_type(stored);
    if (held != stored) footprint_.conversions.push_back({spec.name, stored, held});
  }
  kv_missing_.assign(static_cast<size_t>(config_.num_layers), 0);
  apply_policy(dense_policy(config_.num_layers), false);
  apply_draft_policy(dense_policy(config_.num_layers));
  clear_stats();
}

Decoder::~Decoder() = default;

int Decoder::position() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return position_;
}

void Decoder::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  position_ = 0;  // the cache is overwritten position by position; nothing else to clear
  generation_start_ = 0;
  std::fill(kv_missing_.begin(), kv_missing_.end(), 0);
  backend_->reset_routing();  // FiRST routes the next sequence afresh
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

void Decoder::prefill(const int32_t* tokens, int n, float* logits_out,
                      const InterruptCheck& interrupted) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_tokens(tokens, n);
  run(PassKind::Prefill, tokens, n, logits_out,
      interrupted && device_ == Device::CPU ? &interrupted : nullptr);
  generation_start_ = position_;  // the decode steps after a prompt are a new generation
}

void Decoder::truncate(int position) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (position < 0 || position > position_) {
    throw std::invalid_argument("truncate: position " + std::to_string(position) +
                                " is outside [0, " + std::to_string(position_) +
                                "] (the tokens in the cache)");
  }
  position_ = position;  // later passes overwrite the K/V beyond it
  generation_start_ = std::min(generation_start_, position_);
  if (position_ == 0) std::fill(kv_missing_.begin(), kv_missing_.end(), 0);
}

void Decoder::step(int32_t token, float* logits_out) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_tokens(&token, 1);
  run(PassKind::Decode, &token, 1, logits_out);
  account(step_record_);
}

void Decoder::verify(const int32_t* tokens, int n, float* logits_out) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (n <= 0) throw std::invalid_argument("verify needs at least one token");
  if (n > kMaxVerifyTokens) {
    throw std::invalid_argument("verify: " + std::to_string(n) + " tokens, at most " +
                                std::to_string(kMaxVerifyTokens) + " in one pass");
  }
  if (!verifies_) {
    throw std::invalid_argument(std::string("verify: the policy (") +
                                policy_kind_name(policy_.rule.kind) +
                                ") decides per token; verify needs dense, static_ffn, "
                                "sub_block, layer_drop or first");
  }
  check_tokens(tokens, n);
  run(PassKind::Verify, tokens, n, logits_out);
}

void Decoder::draft_step(int32_t token, float* logits_out) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (policy_.rule.kind == PolicyKind::FiRST) {
    throw std::invalid_argument(
        "draft_step: the policy is FiRST, whose routed-off layers have no K/V for a draft to "
        "read; draft with FiRST as the draft policy of a dense policy instead");
  }
  check_tokens(&token, 1);
  run(PassKind::Draft, &token, 1, logits_out);
}

void Decoder::run(PassKind kind, const int32_t* tokens, int n, float* logits_out,
                  const InterruptCheck* interrupted) {
  Pass pass;
  pass.kind = kind;
  pass.tokens = tokens;
  pass.n = n;
  pass.pos = position_;
  pass.decode_index = position_ - generation_start_;
  // A draft step never routes: the policy's pass that starts the sequence does, for both.
  pass.routes = position_ == 0 && kind != PassKind::Draft &&
                routing_owner(policy_, draft_policy_) != RoutingOwner::None;
  pass.record = kind == PassKind::Decode  ? &step_record_
                : kind == PassKind::Draft ? &draft_record_
                                          : nullptr;
  pass.logits = logits_out;
  pass.interrupted = interrupted;
  const std::vector<uint8_t>& removed =
      kind == PassKind::Draft ? draft_attention_removed_ : attention_removed_;
  for (size_t l = 0; l < kv_missing_.size(); ++l) {
    if (position_ > 0 && kv_missing_[l] && !removed[l]) {
      throw std::invalid_argument(
          "the cache holds no K/V of layer " + std::to_string(l) + ", whose attention an "
          "earlier policy removed in this sequence: call reset() before running it again");
    }
  }
  backend_->run(pass);  // an Interrupted pass wrote K/V beyond position_ only: overwritten later
  position_ += n;
  // Draft steps are truncated away: only the policy's passes leave holes in the sequence.
  if (kind != PassKind::Draft) {
    for (size_t l = 0; l < kv_missing_.size(); ++l) kv_missing_[l] |= removed[l];
  }
}

int64_t WeightFootprint::dense_step_bytes() const {
  int64_t bytes = head;
  for (const Layer& l : layers) bytes += l.q + l.kv + l.o + l.ffn;
  return bytes;
}

void Decoder::account(const StepRecord& record) {
  const SkipRule& rule = policy_.rule;
  const bool in_warmup = rule.kind == PolicyKind::FFNSkip &&
                         position_ - 1 - generation_start_ < rule.warmup_tokens;
  ++stats_.decode_tokens;
  stats_.warmup_tokens += in_warmup ? 1 : 0;
  int64_t bytes = footprint_.head;
  for (int l = 0; l < config_.num_layers; ++l) {
    const bool skipped = record.ffn_skipped[l] != 0;
    (skipped ? stats_.ffn_skipped : stats_.ffn_run)[l] += 1;
    stats_.layer_skipped[l] += record.layer_skipped[l] != 0 ? 1 : 0;
    stats_.ffn_skipped_after_warmup[l] += skipped && !in_warmup ? 1 : 0;
    const WeightFootprint::Layer& w = footprint_.layers[l];
    if (record.layer_skipped[l] == 0) {
      bytes += w.q + w.kv + w.o;
    } else if (kv_only_[l]) {
      bytes += w.kv;
    }
    if (!skipped) bytes += w.ffn;
  }
  stats_.weight_bytes_read += bytes;
  if (tracing_) trace_.push_back(record);
}

// Compiles the plan and hands it to the backend. The sequence's routing is kept while the same
// side (policy or draft) stays FiRST (mid-sequence the decoder changes a FiRST policy only so,
// or to toggle tracing, and a new sequence routes afresh anyway); any other change runs every
// layer again.
void Decoder::apply_policy(const SkipPolicy& policy, bool tracing) {
  const RoutingOwner owner = routing_owner(policy_, draft_policy_);
  const bool keeps_routing =
      owner != RoutingOwner::None && owner == routing_owner(policy, draft_policy_);
  const ExecutionPlan plan = compile_plan(policy, tracing);
  backend_->set_plan(plan);
  verifies_ = plan.verifies();
  kv_only_.assign(plan.decode.size(), 0);
  attention_removed_ = removed_attention_layers(plan);
  for (size_t l = 0; l < plan.decode.size(); ++l) {
    kv_only_[l] = plan.decode[l].attention == AttentionMode::KVOnly ? 1 : 0;
  }
  if (!keeps_routing) backend_->reset_routing();
  policy_ = policy;
  tracing_ = tracing;
}

void Decoder::apply_draft_policy(const SkipPolicy& policy) {
  const RoutingOwner owner = routing_owner(policy_, draft_policy_);
  const bool keeps_routing =
      owner != RoutingOwner::None && owner == routing_owner(policy_, policy);
  const ExecutionPlan plan = compile_plan(policy, false);
  backend_->set_draft_plan(plan);
  draft_attention_removed_ = removed_attention_layers(plan);
  if (!keeps_routing) backend_->reset_routing();
  draft_policy_ = policy;
}

void Decoder::set_draft_policy(const SkipPolicy& policy) {
  std::lock_guard<std::mutex> lock(mutex_);
  policy.validate(config_.num_layers, config_.hidden_size);
  check_draft_routing(policy_.rule.kind, attention_removed_, policy);
  apply_draft_policy(policy);
}

bool Decoder::verifies() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return verifies_;
}

SkipPolicy Decoder::draft_policy() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return draft_policy_;
}

void Decoder::set_policy(const SkipPolicy& policy) {
  std::lock_guard<std::mutex> lock(mutex_);
  policy.validate(config_.num_layers, config_.hidden_size);
  check_draft_routing(policy.rule.kind, removed_attention_layers(compile_plan(policy, false)),
                      draft_policy_);
  if (policy_.rule.kind == PolicyKind::FiRST && policy.rule.kind != PolicyKind::FiRST &&
      position_ > 0) {
    std::vector<uint8_t> active;
    std::vector<float> gate;
    backend_->sequence_layers(active, gate);
    if (std::find(active.begin(), active.end(), 0) != active.end()) {
      throw std::invalid_argument(
          "the cache holds no K/V of the layers FiRST skipped in this sequence: call reset() "
          "before leaving the FiRST policy");
    }
  }
  apply_policy(policy, tracing_);
}

SkipPolicy Decoder::policy() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return policy_;
}

DecodeStats Decoder::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  DecodeStats stats = stats_;
  backend_->sequence_layers(stats.layer_active, stats.router_gate);
  stats.kv_cache_bytes = backend_->kv_cache_bytes();
  stats.decode_step_kernels = backend_->decode_step_kernels();
  return stats;
}

void Decoder::reset_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  clear_stats();
}

void Decoder::clear_stats() {
  const size_t layers = static_cast<size_t>(config_.num_layers);
  stats_ = DecodeStats{};
  stats_.ffn_run.assign(layers, 0);
  stats_.ffn_skipped.assign(layers, 0);
  stats_.layer_skipped.assign(layers, 0);
  stats_.ffn_skipped_after_warmup.assign(layers, 0);
}

void Decoder::enable_trace(bool enabled) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (enabled == tracing_) return;
  apply_policy(policy_, enabled);
}

std::vector<StepRecord> Decoder::trace() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return trace_;
}

void Decoder::clear_trace() {
  std::lock_guard<std::mutex> lock(mutex_);
  trace_.clear();
}

}  // namespace ffnskip
