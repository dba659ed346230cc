// Decode throughput of the engine on random weights of a given shape (no checkpoint needed).
//   bench_decode [--preset smollm2-135m|llama2-7b|llama3-8b] [--layers N] [--hidden N]
//                [--intermediate N] [--heads N] [--kv-heads N] [--vocab N] [--tokens N]
//                [--prompt N] [--threads N] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
//                [--policy LIST] [--cuda-graphs 0|1] [--decode-gemv custom|cublas]
//                [--weights f32|q8_0|q5_0|q4_k|q6_k]
// --weights: every matrix made as random blocks of that GGUF format, kept as stored (dtype auto,
// the default with a block format) or converted to --dtype. Without it the matrices are made
// as fp32 values on the CPU and, on CUDA, directly in the --dtype the GPU holds, so that the
// upload converts nothing. On CUDA every layer is given the same host tensors (the upload copies
// them into each layer's own device memory; the timings do not depend on the values): a 7-8B
// model then takes a few GB of host memory (one layer, the embedding and the head).
// --policy takes a comma-separated list, measured in turn on the same weights:
//   dense          no skipping (the reference of the speedups)
//   static:F       StaticFFNSkip of round(F * layers) FFN blocks, a contiguous middle window
//   ffnskip-never  FFNSkipPolicy(threshold=1.0): scores and decisions on, nothing skipped,
//                  i.e. the cost of the gating itself
// Prints decode tokens/s, the bytes of weights read per token (every layer weight the step
// runs, the final norm and the LM head, not the embedding table, at the storage type's size),
// the bandwidth as a fraction of the bandwidth measured in the same run (CUDA: a
// device-to-device copy; CPU: the threads streaming a 1 GiB buffer through the kernels' vector
// loads), the prefill rate of the --prompt tokens, per policy the speedup over dense against
// the ideal from bytes not read, and on CUDA the kernels one decode step launches (the nodes of
// its captured graph).
// On the CPU, FFNSKIP_CPU_ISA=avx2 or default measures a lower instruction set's kernels.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../csrc/core/cuda_loader.h"
#include "../csrc/core/skip_rule.h"
#include "../csrc/cpu/bandwidth.h"
#include "../csrc/cpu/simd.h"
#include "random_blocks.h"
#include "ffnskip/decoder.h"

using namespace ffnskip;

namespace {

ModelConfig preset(const std::string& name) {
  ModelConfig c;
  c.rms_norm_eps = 1e-5f;
  if (name == "smollm2-135m") {
    c.vocab_size = 49152; c.hidden_size = 576; c.intermediate_size = 1536; c.num_layers = 30;
    c.num_heads = 9; c.num_kv_heads = 3; c.tie_word_embeddings = true; c.rope_theta = 100000;
  } else if (name == "llama2-7b") {
    c.vocab_size = 32000; c.hidden_size = 4096; c.intermediate_size = 11008; c.num_layers = 32;
    c.num_heads = 32; c.num_kv_heads = 32;
  } else if (name == "llama3-8b") {
    c.vocab_size = 128256; c.hidden_size = 4096; c.intermediate_size = 14336; c.num_layers = 32;
    c.num_heads = 32; c.num_kv_heads = 8; c.rope_theta = 500000;
  } else {
    throw std::invalid_argument("unknown preset '" + name + "'");
  }
  c.head_dim = c.hidden_size / c.num_heads;
  c.max_position_embeddings = 4096;
  return c;
}

struct RandomWeights {
  WeightMap map;
  TensorType matrices = TensorType::F32;  // F32, F16, BF16 or a block format, for every matrix
  bool share_layers = false;  // every layer's tensors are layer 0's
  uint64_t next_seed = 1234;

  // The view owns its values, so that a backend reads them in place where it can.
  void add(const std::string& name, std::vector<int64_t> shape, float scale) {
    const bool blocks = shape.size() == 2 && is_block_format(matrices);
    const TensorType type = shape.size() == 2 ? matrices : TensorType::F32;  // vectors: fp32
    const size_t bytes = blocks ? bench::block_format_bytes(type, shape[0], shape[1])
                                : static_cast<size_t>(numel(shape)) * element_bytes(type);
    auto data = std::make_shared<std::vector<uint8_t>>(bytes);
    if (blocks) {
      bench::fill_random_blocks(type, shape[0], shape[1], next_seed++, scale, data->data());
    } else {
      bench::fill_uniform(type, static_cast<size_t>(numel(shape)), next_seed++, scale,
                          data->data());
    }
    map[name] = TensorView{data->data(), type, std::move(shape), data};
  }

  static int64_t numel(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  static size_t element_bytes(TensorType dense) { return dense == TensorType::F32 ? 4 : 2; }
  static bool is_block_format(TensorType t) {
    return t != TensorType::F32 && t != TensorType::F16 && t != TensorType::BF16;
  }
};

const WeightMap& random_weights(const ModelConfig& c, RandomWeights& w) {
  const int64_t h = c.hidden_size, f = c.intermediate_size;
  const float s = 1.0f / std::sqrt(static_cast<float>(h));
  w.add("model.embed_tokens.weight", {c.vocab_size, h}, 1.0f);
  const std::string first_layer = "model.layers.0.";
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    if (l > 0 && w.share_layers) {
      for (const char* part : {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                               "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
        w.map[p + part + ".weight"] = w.map.at(first_layer + part + ".weight");
      }
      continue;
    }
    w.add(p + "input_layernorm.weight", {h}, 1.0f);
    w.add(p + "self_attn.q_proj.weight", {c.q_dim(), h}, s);
    w.add(p + "self_attn.k_proj.weight", {c.kv_dim(), h}, s);
    w.add(p + "self_attn.v_proj.weight", {c.kv_dim(), h}, s);
    w.add(p + "self_attn.o_proj.weight", {h, c.q_dim()}, s);
    w.add(p + "post_attention_layernorm.weight", {h}, 1.0f);
    w.add(p + "mlp.gate_proj.weight", {f, h}, s);
    w.add(p + "mlp.up_proj.weight", {f, h}, s);
    w.add(p + "mlp.down_proj.weight", {h, f}, 1.0f / std::sqrt(static_cast<float>(f)));
  }
  w.add("model.norm.weight", {h}, 1.0f);
  if (!c.tie_word_embeddings) w.add("lm_head.weight", {c.vocab_size, h}, s);
  return w.map;
}

SkipPolicy parse_policy(const std::string& spec, int num_layers) {
  SkipPolicy policy;
  policy.rule.num_layers = num_layers;
  if (spec == "dense") return policy;
  if (spec == "ffnskip-never") {
    policy.rule.kind = PolicyKind::FFNSkip;
    policy.rule.threshold = 1.0f;  // a skip needs score > threshold: never
    policy.rule.warmup_tokens = 0;
    policy.rule.full_token_interval = 0;
    policy.rule.max_skips = num_layers;
    policy.rule.cold_start = policy.rule.cold_end =
        static_cast<int32_t>(std::lround(num_layers / 6.0));
    return policy;
  }
  if (spec.rfind("static:", 0) == 0) {
    const double fraction = std::stod(spec.substr(7));
    const int count = static_cast<int>(std::lround(fraction * num_layers));
    if (fraction < 0 || count >= num_layers) {
      throw std::invalid_argument("static:F needs 0 <= F and fewer skipped layers than layers");
    }
    policy.rule.kind = PolicyKind::StaticFFN;
    const int first = (num_layers - count) / 2;
    for (int l = first; l < first + count; ++l) policy.layers.push_back(l);
    return policy;
  }
  throw std::invalid_argument("unknown policy '" + spec + "' (dense, static:F, ffnskip-never)");
}

std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> items;
  std::stringstream stream(list);
  for (std::string item; std::getline(stream, item, ',');) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

DType parse_bench_dtype(const std::string& name) {
  if (name == "fp32") return DType::F32;
  if (name == "fp16") return DType::F16;
  if (name == "bf16") return DType::BF16;
  return parse_dtype(name);
}

struct PolicyResult {
  std::string name;
  double tokens_per_s = 0;
  double skipped_fraction = 0;  // FFN blocks skipped / (tokens * layers)
  double bytes_per_token = 0;
  double prefill_tokens_per_s = 0;  // the prompt's prefill, from an empty cache
  int step_kernels = 0;             // CUDA: kernels of the captured decode step
};

// Times `tokens` decode steps after a prefill of `prompt` tokens and one untimed step.
PolicyResult run_policy(Decoder& decoder, const std::string& name, int prompt, int tokens) {
  const ModelConfig& c = decoder.config();
  decoder.set_policy(parse_policy(name, c.num_layers));
  decoder.reset();
  std::vector<int32_t> prompt_ids(prompt);
  for (int i = 0; i < prompt; ++i) prompt_ids[i] = (i * 7919) % c.vocab_size;
  std::vector<float> logits(c.vocab_size);
  const auto prefill_start = std::chrono::steady_clock::now();
  decoder.prefill(prompt_ids.data(), prompt, logits.data());
  const double prefill_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - prefill_start).count();
  decoder.step(1, logits.data());  // warm-up (on CUDA: captures the decode graph)
  decoder.reset_stats();

  const auto start = std::chrono::steady_clock::now();
  int32_t token = 2;
  for (int i = 0; i < tokens; ++i) {
    decoder.step(token, logits.data());
    token = static_cast<int32_t>((token * 31 + 7) % c.vocab_size);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const DecodeStats stats = decoder.stats();
  int64_t skipped = 0;
  for (int64_t s : stats.ffn_skipped) skipped += s;
  PolicyResult result;
  result.name = name;
  result.tokens_per_s = tokens / seconds;
  result.prefill_tokens_per_s = prompt / prefill_seconds;
  result.skipped_fraction =
      static_cast<double>(skipped) / (static_cast<double>(tokens) * c.num_layers);
  result.bytes_per_token = static_cast<double>(stats.weight_bytes_read) / tokens;
  result.step_kernels = stats.decode_step_kernels;
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string preset_name = "smollm2-135m", device = "cpu", dtype_name_arg, policies = "dense";
    std::string weights_name = "f32";
    int tokens = 64, prompt = 16, threads = 0;
    ModelConfig c = preset(preset_name);
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (i + 1 >= argc) throw std::invalid_argument("missing value after " + arg);
      const std::string value = argv[++i];
      if (arg == "--preset") { preset_name = value; c = preset(value); }
      else if (arg == "--layers") c.num_layers = std::stoi(value);
      else if (arg == "--hidden") c.hidden_size = std::stoi(value);
      else if (arg == "--intermediate") c.intermediate_size = std::stoi(value);
      else if (arg == "--heads") c.num_heads = std::stoi(value);
      else if (arg == "--kv-heads") c.num_kv_heads = std::stoi(value);
      else if (arg == "--vocab") c.vocab_size = std::stoi(value);
      else if (arg == "--tokens") tokens = std::stoi(value);
      else if (arg == "--prompt") prompt = std::stoi(value);
      else if (arg == "--threads") threads = std::stoi(value);
      else if (arg == "--device") device = value;
      else if (arg == "--dtype") dtype_name_arg = value;
      else if (arg == "--policy") policies = value;
      else if (arg == "--weights") weights_name = value;
      // Read by the CUDA backend when the decoder is made.
      else if (arg == "--cuda-graphs") setenv("FFNSKIP_CUDA_GRAPHS", value.c_str(), 1);
      else if (arg == "--decode-gemv") setenv("FFNSKIP_DECODE_GEMV", value.c_str(), 1);
      else throw std::invalid_argument("unknown argument " + arg);
    }
    if (device != "cpu" && device != "cuda") {
      throw std::invalid_argument("--device must be cpu or cuda, got " + device);
    }
    c.head_dim = c.hidden_size / c.num_heads;
    const bool cuda = device == "cuda";
    if (cuda && !cuda_info().available) {
      throw std::invalid_argument(cuda_info().error);  // before gigabytes of random weights
    }
    RandomWeights storage;
    std::string weights_upper = weights_name;
    for (char& ch : weights_upper) ch = static_cast<char>(std::toupper(ch));
    storage.matrices = parse_tensor_type(weights_upper);
    if (storage.matrices != TensorType::F32 && !RandomWeights::is_block_format(storage.matrices)) {
      throw std::invalid_argument("--weights takes f32 or a block format; --dtype the rest");
    }
    const bool blocks = storage.matrices != TensorType::F32;
    const DType dtype = parse_bench_dtype(!dtype_name_arg.empty() ? dtype_name_arg
                                          : blocks          ? "auto"
                                          : cuda            ? "fp16"
                                                            : "fp32");
    if (cuda) {
      // The CPU reads the weights in place: shared layers would sit in its caches.
      storage.share_layers = true;
      if (!blocks) {
        storage.matrices = dtype == DType::F32 ? TensorType::F32
                           : dtype == DType::BF16 ? TensorType::BF16
                                                  : TensorType::F16;
      }
    }

    const WeightMap& weights = random_weights(c, storage);
    DecoderOptions options;
    options.device = cuda ? Device::CUDA : Device::CPU;
    options.dtype = dtype;
    options.max_seq_len = prompt + tokens + 1;
    options.num_threads = threads;
    Decoder decoder(c, weights, options);
    storage.map.clear();  // the decoder holds what it reads in place

    std::printf("preset=%s device=%s weights=%s dtype=%s layers=%d hidden=%d intermediate=%d "
                "heads=%d/%d vocab=%d prompt=%d tokens=%d\n",
                preset_name.c_str(), device.c_str(), tensor_type_name(storage.matrices),
                dtype_name(dtype), c.num_layers,
                c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.vocab_size,
                prompt, tokens);
    double peak_gbs = 0;  // the bandwidth the "of_peak" column divides by
    if (cuda) {
      const CudaInfo info = cuda_info();
      peak_gbs = cuda_copy_bandwidth(size_t{1} << 30, 20) / 1e9;
      std::printf("gpu=%s cuda_runtime=%s driver=%s cublas=%s d2d_copy=%.0f GB/s\n",
                  info.device_name.c_str(), info.runtime_version.c_str(),
                  info.driver_version.c_str(), info.cublas_version.c_str(), peak_gbs);
    } else {
      peak_gbs = cpu::measure_read_bandwidth(int64_t{1} << 30, threads, 5) / 1e9;
      std::printf("cpu_isa=%s threads=%d read_bandwidth=%.1f GB/s\n",
                  cpu::isa_name(cpu::kernel_isa()), threads, peak_gbs);
    }

    // One untimed prefill: the first pays one-time costs (CUDA's lazy loading of kernels,
    // cuBLAS's first GEMMs) that would otherwise land in the first policy's prefill rate.
    {
      std::vector<int32_t> ids(prompt, 1);
      std::vector<float> logits(c.vocab_size);
      decoder.prefill(ids.data(), prompt, logits.data());
    }
    std::vector<PolicyResult> results;
    for (const std::string& name : split_list(policies)) {
      results.push_back(run_policy(decoder, name, prompt, tokens));
    }
    const PolicyResult* dense = nullptr;
    for (const auto& r : results) {
      if (r.name == "dense") dense = &r;
    }
    std::printf("%-14s %10s %9s %9s %10s %9s %9s %10s %8s %9s\n", "policy", "tokens/s",
                "ms/token", "ffn_skip", "MB/token", "GB/s", "of_peak", "prefill/s", "kernels",
                "speedup");
    for (const auto& r : results) {
      const double gbs = r.bytes_per_token * r.tokens_per_s / 1e9;
      std::printf("%-14s %10.2f %9.3f %8.1f%% %10.1f %9.1f", r.name.c_str(), r.tokens_per_s,
                  1e3 / r.tokens_per_s, 100 * r.skipped_fraction, r.bytes_per_token / 1e6, gbs);
      std::printf(" %8.1f%% %10.1f %8d", 100 * gbs / peak_gbs, r.prefill_tokens_per_s,
                  r.step_kernels);
      if (dense != nullptr) {
        // Ideal: time proportional to the bytes read.
        const double speedup = r.tokens_per_s / dense->tokens_per_s;
        const double ideal = dense->bytes_per_token / r.bytes_per_token;
        std::printf(" %8.3fx (ideal %.3fx: %.1f%% of it)", speedup, ideal, 100 * speedup / ideal);
      }
      std::printf("\n");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_decode: %s\n", e.what());
    return 1;
  }
}
