// The decoder: one model, one KV cache, one backend, one skip policy. Inputs are checked
// before any work, so a rejected call leaves the cache, position and policy as they were.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ffnskip/config.h"
#include "ffnskip/policy.h"
#include "ffnskip/weights.h"

namespace ffnskip {

enum class PassKind : uint8_t;  // csrc/core/plan.h

class Backend;  // csrc/core/backend.h

enum class Device { CPU, CUDA };
Device parse_device(const std::string& name);  // "cpu" or "cuda"
const std::vector<std::string>& device_names();
// How the weights are stored: as the checkpoint stores them (Auto: floats or GGUF blocks, read
// in place when the checkpoint stays mapped), or converted to fp32, fp16 or bf16. Activations
// and accumulation are fp32.
enum class DType { Auto, F32, F16, BF16 };

// "auto", "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16"
DType parse_dtype(const std::string& name);
const char* dtype_name(DType dtype);
// The canonical names, "auto", "float32", "float16", "bfloat16".
const std::vector<std::string>& dtype_names();

// The most tokens one Decoder::verify() appends: a speculative draft of up to 64 tokens after
// the last accepted one.
constexpr int kMaxVerifyTokens = 65;

// Throws std::invalid_argument unless 0 <= token < vocab_size; `index` is its place in the input.
void check_token_id(int64_t token, int64_t index, int vocab_size);

// Asked between the sub-blocks of a CPU prefill (a CUDA pass is queued at once and not asked):
// true stops the pass, and prefill throws Interrupted.
using InterruptCheck = std::function<bool()>;

// A prefill stopped by its InterruptCheck: the cache, position and policy are as before it.
class Interrupted : public std::runtime_error {
 public:
  Interrupted() : std::runtime_error("prefill interrupted") {}
};

struct DecoderOptions {
  Device device = Device::CPU;
  DType dtype = DType::Auto;
  int max_seq_len = 0;   // 0: min(max_position_embeddings, 8192)
  int num_threads = 0;   // CPU worker threads including the caller; 0: all hardware threads
  // The KV cache's elements. Auto: fp32 on the CPU, the activation dtype on CUDA (which takes
  // nothing else); F16 on the CPU halves the cache's memory and the bytes decode attention
  // streams, as llama.cpp's default cache.
  DType kv_cache_dtype = DType::Auto;
};

// The weights as a backend stores them: bytes per storage type, the matrices held in another
// type than the checkpoint's, and what each sub-block of each layer and the LM head read (a
// decode step reads each weight it runs once).
struct WeightFootprint {
  std::vector<std::pair<TensorType, int64_t>> bytes_by_type;
  struct Conversion {
    std::string tensor;  // Hugging Face name
    TensorType stored, held;
  };
  std::vector<Conversion> conversions;  // in model_tensors order
  struct Layer {
    int64_t q = 0, kv = 0, o = 0, ffn = 0;  // q, k + v, output projection; gate + up + down
  };
  std::vector<Layer> layers;
  int64_t head = 0;  // the final norm's linear to the vocabulary

  int64_t dense_step_bytes() const;  // every layer and the head
};

// Decode-step counters since the last reset_stats().
struct DecodeStats {
  int64_t decode_tokens = 0;
  int64_t warmup_tokens = 0;  // decode tokens inside the policy's warm-up (FFNSkip)
  std::vector<int64_t> ffn_run, ffn_skipped;      // per layer
  std::vector<int64_t> layer_skipped;             // per layer: attention skipped or K/V only
  std::vector<int64_t> ffn_skipped_after_warmup;  // per layer
  int64_t weight_bytes_read = 0;  // by the decode steps: the weights of what they ran
  // The current sequence (not counters): FiRST's routing and the KV cache allocated.
  std::vector<uint8_t> layer_active;  // per layer: 1 when it runs for this sequence
  std::vector<float> router_gate;     // per layer: FiRST gate, NaN when not routed
  int64_t kv_cache_bytes = 0;
  // CUDA: kernels one decode step launches (its captured graph's); 0 before the first graph
  // replay, with graphs off and on the CPU.
  int decode_step_kernels = 0;
};

class Decoder {
 public:
  // Copies the weights into the backend; `weights` may be freed afterwards. Throws
  // std::invalid_argument naming the problem (a tensor, an option, the memory needed).
  Decoder(const ModelConfig& config, const WeightMap& weights, const DecoderOptions& options);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  const ModelConfig& config() const { return config_; }
  int max_seq_len() const { return max_seq_len_; }
  int position() const;
  Device device() const { return device_; }
  DType dtype() const { return dtype_; }

  void reset();
  // Appends the prompt to the cache; writes the logits of its last token (vocab_size floats).
  // `interrupted` lets a long prompt be abandoned (Interrupted), see InterruptCheck.
  void prefill(const int32_t* tokens, int n, float* logits_out,
               const InterruptCheck& interrupted = nullptr);
  // Appends one token; writes its logits.
  void step(int32_t token, float* logits_out);
  // Keeps the first `position` tokens of the cache (0 <= position <= position()): later passes
  // overwrite what followed. FiRST's routing of the sequence is kept, except that a pass at
  // position 0 routes a new one.
  void truncate(int position);

  // Speculative decoding. verify() appends n tokens (1 <= n <= kMaxVerifyTokens) under the
  // policy in one pass that reads each weight once (the CPU: one pass per 16 tokens) and
  // writes the logits of every one (n * vocab_size floats; row t follows tokens[0..t]): what
  // n step() calls return, to float rounding; on the CPU bit for bit, as its passes of up to
  // 16 tokens compute each token as a step does. The policy must decide nothing per token
  // (dense, static FFN skip, layer drop, FiRST; verifies()). draft_step() appends one token
  // under the draft policy (dense until set) on the same cache; after truncate() a verify
  // pass overwrites the K/V of drafted positions. Both policies stay compiled, so alternating
  // them costs nothing. Neither call counts in stats().
  void verify(const int32_t* tokens, int n, float* logits_out);
  void draft_step(int32_t token, float* logits_out);
  // Validates, then applies to later draft steps; on error the previous draft stays. A FiRST
  // draft is routed by the pass that starts a sequence (which runs every layer for the
  // policy), so it needs a policy that runs every layer in a prefill and is not FiRST itself.
  // Draft steps under a FiRST policy are refused (the layers it routed off have no K/V).
  void set_draft_policy(const SkipPolicy& policy);
  bool verifies() const;
  SkipPolicy draft_policy() const;

  // Validates, then applies to later steps; on error the previous policy stays. A FiRST
  // policy routes whole sequences: set mid-sequence, it routes from the next sequence on (every
  // layer runs until then), and leaving it mid-sequence is refused when it skipped layers
  // (their K/V are missing).
  void set_policy(const SkipPolicy& policy);
  SkipPolicy policy() const;

  DecodeStats stats() const;
  void reset_stats();
  const WeightFootprint& weight_footprint() const { return footprint_; }
  // While enabled, every decode step appends its StepRecord (scores are computed for it).
  void enable_trace(bool enabled);
  std::vector<StepRecord> trace() const;
  void clear_trace();

 private:
  void check_tokens(const int32_t* tokens, int n) const;
  void run(PassKind kind, const int32_t* tokens, int n, float* logits_out,
           const InterruptCheck* interrupted = nullptr);
  void apply_policy(const SkipPolicy& policy, bool tracing);
  void apply_draft_policy(const SkipPolicy& policy);
  void account(const StepRecord& record);
  void clear_stats();

  ModelConfig config_;
  Device device_;
  DType dtype_;
  int max_seq_len_ = 0;
  int position_ = 0;
  // Position where the current generation began: the end of the last prefill (0 after
  // reset). A decode step's index (warm-up, the random rule's keys) is its distance from it.
  int generation_start_ = 0;
  std::unique_ptr<Backend> backend_;
  SkipPolicy policy_;
  SkipPolicy draft_policy_;
  bool verifies_ = false;  // the policy decides nothing per token (ExecutionPlan::verifies)
  std::vector<uint8_t> kv_only_;  // per layer: a decode step writes only its K/V (early exit)
  // Per layer: the policy's / the draft policy's plan removes its attention (no K/V written),
  // and an earlier pass of this sequence did so (a pass that attends there would read holes).
  std::vector<uint8_t> attention_removed_, draft_attention_removed_, kv_missing_;
  WeightFootprint footprint_;
  DecodeStats stats_;
  bool tracing_ = false;
  std::vector<StepRecord> trace_;
  StepRecord step_record_, draft_record_;
  // Serialises calls: one Decoder used from several threads never interleaves two passes.
  mutable std::mutex mutex_;
};

}  // namespace ffnskip
