// pybind11 bindings: conversions between Python/NumPy and the C++ core, nothing else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../core/cuda_loader.h"
#include "../cpu/bandwidth.h"
#include "../cpu/simd.h"
#include "ffnskip/decoder.h"

namespace py = pybind11;
using namespace ffnskip;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using TokenArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Reads the fields of a ffnskip_ext.config.ModelConfig (or any object with those attributes).
ModelConfig to_model_config(const py::object& obj) {
  ModelConfig c;
  c.architecture = obj.attr("architecture").cast<std::string>();
  c.vocab_size = obj.attr("vocab_size").cast<int>();
  c.hidden_size = obj.attr("hidden_size").cast<int>();
  c.intermediate_size = obj.attr("intermediate_size").cast<int>();
  c.num_layers = obj.attr("num_layers").cast<int>();
  c.num_heads = obj.attr("num_heads").cast<int>();
  c.num_kv_heads = obj.attr("num_kv_heads").cast<int>();
  c.head_dim = obj.attr("head_dim").cast<int>();
  c.rms_norm_eps = obj.attr("rms_norm_eps").cast<float>();
  c.rope_theta = obj.attr("rope_theta").cast<double>();
  c.rope_type = parse_rope_type(obj.attr("rope_type").cast<std::string>());
  c.rope_factor = obj.attr("rope_factor").cast<double>();
  c.rope_low_freq_factor = obj.attr("rope_low_freq_factor").cast<double>();
  c.rope_high_freq_factor = obj.attr("rope_high_freq_factor").cast<double>();
  c.rope_original_max_position = obj.attr("rope_original_max_position").cast<int>();
  c.tie_word_embeddings = obj.attr("tie_word_embeddings").cast<bool>();
  c.qkv_bias = obj.attr("qkv_bias").cast<bool>();
  c.o_bias = obj.attr("o_bias").cast<bool>();
  c.mlp_bias = obj.attr("mlp_bias").cast<bool>();
  c.max_position_embeddings = obj.attr("max_position_embeddings").cast<int>();
  return c;
}

Device to_device(const std::string& name) {
  if (name == "cpu") return Device::CPU;
  if (name == "cuda") return Device::CUDA;
  throw std::invalid_argument("unknown device '" + name + "' (expected 'cpu' or 'cuda')");
}

// NumPy int64 ids to the core's int32, rejecting values that do not fit instead of wrapping.
std::vector<int32_t> to_token_ids(const TokenArray& tokens, int vocab_size) {
  if (tokens.ndim() != 1) {
    throw std::invalid_argument("token ids must be a 1-D sequence, got " +
                                std::to_string(tokens.ndim()) + " dimensions");
  }
  std::vector<int32_t> ids(tokens.size());
  const int64_t* data = tokens.data();
  for (py::ssize_t i = 0; i < tokens.size(); ++i) {
    check_token_id(data[i], i, vocab_size);
    ids[i] = static_cast<int32_t>(data[i]);
  }
  return ids;
}

PolicyKind to_policy_kind(const std::string& name) {
  if (name == "dense") return PolicyKind::Dense;
  if (name == "ffn_skip") return PolicyKind::FFNSkip;
  if (name == "static_ffn") return PolicyKind::StaticFFN;
  if (name == "random_ffn") return PolicyKind::RandomFFN;
  if (name == "layer_drop") return PolicyKind::LayerDrop;
  if (name == "early_exit") return PolicyKind::EarlyExit;
  if (name == "first") return PolicyKind::FiRST;
  throw std::invalid_argument("unknown policy kind '" + name + "'");
}

std::vector<float> flat_floats(const py::handle& value) {
  const auto array = FloatArray::ensure(value);
  if (!array) throw std::invalid_argument("expected an array of floats");
  return std::vector<float>(array.data(), array.data() + array.size());
}

// The keyword arguments of Policy.engine_args() (python/ffnskip_ext/policies.py); fields not
// given keep SkipRule's defaults.
SkipPolicy to_skip_policy(const py::kwargs& args, int num_layers) {
  SkipPolicy policy;
  SkipRule& r = policy.rule;
  r.num_layers = num_layers;
  for (const auto& item : args) {
    const auto key = item.first.cast<std::string>();
    const py::handle value = item.second;
    if (key == "kind") r.kind = to_policy_kind(value.cast<std::string>());
    else if (key == "threshold") r.threshold = value.cast<float>();
    else if (key == "warmup_tokens") r.warmup_tokens = value.cast<int>();
    else if (key == "full_token_interval") r.full_token_interval = value.cast<int>();
    else if (key == "max_skips") r.max_skips = value.cast<int>();
    else if (key == "cold_start") r.cold_start = value.cast<int>();
    else if (key == "cold_end") r.cold_end = value.cast<int>();
    else if (key == "exit_layer") r.exit_layer = value.cast<int>();
    else if (key == "seed") r.seed = value.cast<uint64_t>();
    else if (key == "layers") policy.layers = value.cast<std::vector<int32_t>>();
    else if (key == "router_weight") policy.router_weight = flat_floats(value);
    else if (key == "router_bias") policy.router_bias = flat_floats(value);
    else throw std::invalid_argument("unknown policy field '" + key + "'");
  }
  return policy;
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& values) {
  return py::array_t<T>(static_cast<py::ssize_t>(values.size()), values.data());
}

// Per-step vectors stacked into a [steps, layers] array.
template <typename T>
py::array_t<T> stack(const std::vector<StepRecord>& steps, std::vector<T> StepRecord::*field,
                     int num_layers) {
  py::array_t<T> out({static_cast<py::ssize_t>(steps.size()), static_cast<py::ssize_t>(num_layers)});
  T* dst = out.mutable_data();
  for (const auto& step : steps) dst = std::copy((step.*field).begin(), (step.*field).end(), dst);
  return out;
}

std::unique_ptr<Decoder> make_decoder(const py::object& config, const py::dict& weights,
                                      const std::string& device, const std::string& dtype,
                                      int max_seq_len, int num_threads) {
  std::vector<FloatArray> keep_alive;
  WeightMap views;
  for (const auto& item : weights) {
    const auto name = item.first.cast<std::string>();
    keep_alive.push_back(FloatArray::ensure(item.second));
    const FloatArray& array = keep_alive.back();
    if (!array) throw std::invalid_argument("tensor '" + name + "' is not a float array");
    TensorView view;
    view.data = array.data();
    view.shape.assign(array.shape(), array.shape() + array.ndim());
    views.emplace(name, std::move(view));
  }
  DecoderOptions options;
  options.device = to_device(device);
  options.dtype = parse_dtype(dtype);
  options.max_seq_len = max_seq_len;
  options.num_threads = num_threads;
  const ModelConfig model_config = to_model_config(config);
  py::gil_scoped_release release;
  return std::make_unique<Decoder>(model_config, views, options);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ffnskip_ext native engine";

  m.def("cuda_available", [] { return cuda_info().available; },
        "True when device='cuda' works: the CUDA backend library loads and a GPU is usable.");
  m.def("build_info", [] {
    const CudaInfo i = cuda_info();
    auto text = [](const std::string& s) {
      return s.empty() ? py::none() : py::object(py::str(s));
    };
    return py::dict(py::arg("cuda_compiled") = i.compiled,
                    py::arg("cuda_runtime") = text(i.runtime_version),
                    py::arg("cuda_driver") = text(i.driver_version),
                    py::arg("cublas") = text(i.cublas_version),
                    py::arg("gpu") = text(i.device_name), py::arg("cuda_error") = text(i.error),
                    py::arg("cpu_isa") = cpu::isa_name(cpu::kernel_isa()));
  }, "CUDA build and machine: compiled or not, CUDA runtime, driver and cuBLAS versions, GPU; "
     "the instruction set of the CPU kernels (avx512, avx2 or default).");

  m.def(
      "measure_read_bandwidth",
      [](int64_t bytes, int num_threads, int repeats) {
        py::gil_scoped_release release;
        return cpu::measure_read_bandwidth(bytes, num_threads, repeats);
      },
      py::arg("bytes") = int64_t{1} << 30, py::arg("num_threads") = 0, py::arg("repeats") = 5,
      "Memory read bandwidth in bytes/s: the best of `repeats` passes of `num_threads` threads "
      "(0: all) streaming a `bytes` buffer through the CPU kernels' vector loads.");

  m.def(
      "validate_config", [](const py::object& config) { to_model_config(config).validate(); },
      py::arg("config"), "Raises ValueError naming the first invalid field of a ModelConfig.");

  m.def(
      "simulate_ffn_skip",
      [](const FloatArray& scores, int64_t first_decode_index, const py::kwargs& args) {
        if (scores.ndim() != 2) throw std::invalid_argument("scores must be [tokens, layers]");
        const SkipPolicy policy = to_skip_policy(args, static_cast<int>(scores.shape(1)));
        if (policy.rule.kind != PolicyKind::FFNSkip) {
          throw std::invalid_argument("simulate_ffn_skip needs an ffn_skip policy");
        }
        policy.validate(policy.rule.num_layers);
        const std::vector<uint8_t> skipped = simulate_ffn_skip(
            policy.rule, scores.data(), static_cast<int>(scores.shape(0)), first_decode_index);
        py::array_t<bool> out({scores.shape(0), scores.shape(1)});
        std::copy(skipped.begin(), skipped.end(), out.mutable_data());
        return out;
      },
      py::arg("scores"), py::arg("first_decode_index") = 0);

  py::class_<Decoder>(m, "Engine")
      .def(py::init(&make_decoder), py::arg("config"), py::arg("weights"),
           py::arg("device") = "cpu", py::arg("dtype") = "float32", py::arg("max_seq_len") = 0,
           py::arg("num_threads") = 0)
      .def_property_readonly("dtype", [](const Decoder& d) { return dtype_name(d.dtype()); })
      .def_property_readonly("position", &Decoder::position)
      .def_property_readonly("max_seq_len", &Decoder::max_seq_len)
      .def("reset", &Decoder::reset, py::call_guard<py::gil_scoped_release>())
      .def("prefill",
           [](Decoder& d, const TokenArray& tokens) {
             const std::vector<int32_t> ids = to_token_ids(tokens, d.config().vocab_size);
             if (ids.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
               throw std::invalid_argument("prompt too long");
             }
             py::array_t<float> logits(d.config().vocab_size);
             float* out = logits.mutable_data();
             {
               py::gil_scoped_release release;
               d.prefill(ids.data(), static_cast<int>(ids.size()), out);
             }
             return logits;
           },
           py::arg("token_ids"))
      .def("step",
           [](Decoder& d, int64_t token) {
             check_token_id(token, 0, d.config().vocab_size);
             py::array_t<float> logits(d.config().vocab_size);
             float* out = logits.mutable_data();
             {
               py::gil_scoped_release release;
               d.step(static_cast<int32_t>(token), out);
             }
             return logits;
           },
           py::arg("token_id"))
      .def("set_policy",
           [](Decoder& d, const py::kwargs& args) {
             const SkipPolicy policy = to_skip_policy(args, d.config().num_layers);
             py::gil_scoped_release release;
             d.set_policy(policy);
           })
      .def("stats",
           [](const Decoder& d) {
             const DecodeStats s = d.stats();
             py::dict out;
             out["decode_tokens"] = s.decode_tokens;
             out["warmup_tokens"] = s.warmup_tokens;
             out["ffn_run"] = to_array(s.ffn_run);
             out["ffn_skipped"] = to_array(s.ffn_skipped);
             out["ffn_skipped_after_warmup"] = to_array(s.ffn_skipped_after_warmup);
             out["layer_skipped"] = to_array(s.layer_skipped);
             out["layer_active"] = to_array(s.layer_active).attr("astype")("bool");
             out["router_gate"] = to_array(s.router_gate);
             out["kv_cache_bytes"] = s.kv_cache_bytes;
             return out;
           })
      .def("reset_stats", &Decoder::reset_stats)
      .def("enable_trace", &Decoder::enable_trace, py::arg("enabled"))
      .def("clear_trace", &Decoder::clear_trace)
      .def("trace", [](const Decoder& d) {
        const std::vector<StepRecord> steps = d.trace();
        const int layers = d.config().num_layers;
        py::dict out;
        out["ffn_skipped"] = stack(steps, &StepRecord::ffn_skipped, layers).attr("astype")("bool");
        out["layer_skipped"] =
            stack(steps, &StepRecord::layer_skipped, layers).attr("astype")("bool");
        out["score"] = stack(steps, &StepRecord::score, layers);
        out["layer_score"] = stack(steps, &StepRecord::layer_score, layers);
        return out;
      });
}
