// pybind11 bindings: conversions between Python/NumPy and the C++ core, nothing else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../core/cuda_loader.h"
#include "../cpu/activation.h"
#include "../cpu/attention.h"
#include "../cpu/bandwidth.h"
#include "../cpu/isa.h"
#include "../cpu/linear.h"
#include "../cpu/norm.h"
#include "../cpu/quant.h"
#include "../cpu/rope.h"
#include "../core/mapped_file.h"
#include "../core/skip_rule.h"
#include "../core/tensor_types.h"
#include "ffnskip/decoder.h"
#include "ffnskip/weights.h"

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
  c.rope_interleaved = obj.attr("rope_interleaved").cast<bool>();
  c.tie_word_embeddings = obj.attr("tie_word_embeddings").cast<bool>();
  c.qkv_bias = obj.attr("qkv_bias").cast<bool>();
  c.o_bias = obj.attr("o_bias").cast<bool>();
  c.mlp_bias = obj.attr("mlp_bias").cast<bool>();
  c.max_position_embeddings = obj.attr("max_position_embeddings").cast<int>();
  return c;
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
    if (key == "kind") r.kind = parse_policy_kind(value.cast<std::string>());
    else if (key == "threshold") r.threshold = value.cast<float>();
    else if (key == "warmup_tokens") r.warmup_tokens = value.cast<int>();
    else if (key == "full_token_interval") r.full_token_interval = value.cast<int>();
    else if (key == "max_skips") r.max_skips = value.cast<int>();
    else if (key == "cold_start") r.cold_start = value.cast<int>();
    else if (key == "cold_end") r.cold_end = value.cast<int>();
    else if (key == "exit_layer") r.exit_layer = value.cast<int>();
    else if (key == "seed") r.seed = value.cast<uint64_t>();
    else if (key == "layers") policy.layers = value.cast<std::vector<int32_t>>();
    else if (key == "attention_layers")
      policy.attention_layers = value.cast<std::vector<int32_t>>();
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

// A tensor of a mapped checkpoint file, as Python's loaders describe it (the file stays mapped
// while a decoder reads the tensor).
TensorView mapped_tensor(const std::shared_ptr<const MappedFile>& file, int64_t offset,
                         const std::string& type, const std::vector<int64_t>& shape) {
  TensorView view;
  view.type = parse_tensor_type(type);
  view.shape = shape;
  for (const int64_t d : shape) {
    if (d <= 0) throw std::invalid_argument("tensor dimensions must be positive");
  }
  const int64_t bytes = view.bytes();
  if (offset < 0 || bytes < 0 || static_cast<uint64_t>(offset) > file->size() ||
      static_cast<uint64_t>(bytes) > file->size() - static_cast<uint64_t>(offset)) {
    throw std::invalid_argument("tensor of " + std::to_string(bytes) + " bytes at offset " +
                                std::to_string(offset) + " runs past the end of " +
                                file->path() + " (" + std::to_string(file->size()) + " bytes)");
  }
  view.data = file->data() + offset;
  view.owner = file;
  return view;
}

std::unique_ptr<Decoder> make_decoder(const py::object& config, const py::dict& weights,
                                      const std::string& device, const std::string& dtype,
                                      int max_seq_len, int num_threads,
                                      const std::string& kv_cache_dtype) {
  std::vector<py::array> keep_alive;  // arrays are borrowed until the decoder is made
  WeightMap views;
  for (const auto& item : weights) {
    const auto name = item.first.cast<std::string>();
    if (py::isinstance<TensorView>(item.second)) {
      views.emplace(name, item.second.cast<TensorView>());
      continue;
    }
    TensorView view;
    py::array array = py::array::ensure(item.second, py::array::c_style);
    if (array && array.dtype().is(py::dtype("float16"))) {
      view.type = TensorType::F16;
    } else {
      array = FloatArray::ensure(item.second);  // other numbers as float32
    }
    if (!array) throw std::invalid_argument("tensor '" + name + "' is not a float array");
    keep_alive.push_back(array);
    view.data = array.data();
    view.shape.assign(array.shape(), array.shape() + array.ndim());
    views.emplace(name, std::move(view));
  }
  DecoderOptions options;
  options.device = parse_device(device);
  options.dtype = parse_dtype(dtype);
  options.max_seq_len = max_seq_len;
  options.num_threads = num_threads;
  options.kv_cache_dtype = parse_dtype(kv_cache_dtype);
  const ModelConfig model_config = to_model_config(config);
  py::gil_scoped_release release;
  return std::make_unique<Decoder>(model_config, views, options);
}

// The engine's InterruptCheck for a call from Python: in the main thread (the only one that
// runs Python's signal handlers) it takes the GIL at most every 50 ms to run pending handlers,
// so that Ctrl-C stops a long prefill; the handler's exception (KeyboardInterrupt) is kept for
// rethrow() once the engine has unwound. Other threads are never interrupted.
class PendingSignals {
 public:
  PendingSignals() {  // with the GIL held
    const py::module_ threading = py::module_::import("threading");
    in_main_thread_ = threading.attr("current_thread")().is(threading.attr("main_thread")());
  }

  InterruptCheck check() {
    if (!in_main_thread_) return nullptr;
    return [this] {
      const auto now = std::chrono::steady_clock::now();
      if (now < next_check_) return false;
      next_check_ = now + std::chrono::milliseconds(50);
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() == 0) return false;
      error_ = std::make_unique<py::error_already_set>();
      return true;
    };
  }

  // With the GIL held: raises the handler's exception.
  [[noreturn]] void rethrow() {
    if (error_) throw *error_;
    throw std::runtime_error("prefill interrupted");
  }

 private:
  bool in_main_thread_ = false;
  std::chrono::steady_clock::time_point next_check_{};
  std::unique_ptr<py::error_already_set> error_;
};

// ---- the per-kernel hooks (tests/test_kernels.py, benchmarks/bench_kernels.py) ----

cpu::Isa to_isa(const std::string& name) {
  for (const cpu::Isa isa : {cpu::Isa::Default, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
    if (name != cpu::isa_name(isa)) continue;
    if (isa > cpu::best_isa()) {
      throw std::invalid_argument("isa " + name + ": this CPU supports at most " +
                                  cpu::isa_name(cpu::best_isa()));
    }
    return isa;
  }
  throw std::invalid_argument("unknown isa '" + name + "' (avx512, avx2 or default)");
}


// A C-contiguous array with the given number of dimensions, or ValueError naming it.
template <typename T>
py::array_t<T, py::array::c_style> need_array(const py::handle& value, int ndim,
                                              const char* name) {
  auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(value);
  if (!a || a.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + " must be a " + std::to_string(ndim) +
                                "-D array");
  }
  return a;
}

void bind_kernels(py::module_ k) {
  py::class_<cpu::ThreadPool>(k, "ThreadPool")
      .def(py::init<int>(), py::arg("num_threads"))
      .def_property_readonly("size", &cpu::ThreadPool::size);
  k.def("isas", [] {
    py::list out;
    for (const cpu::Isa isa : {cpu::Isa::Default, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
      if (isa <= cpu::best_isa()) out.append(cpu::isa_name(isa));
    }
    return out;
  }, "The instruction sets this CPU runs, lowest first.");

  k.def(
      "linear",
      [](cpu::ThreadPool& pool, const py::array& weight, const std::string& type,
         const py::object& bias, const py::handle& x, const py::object& accumulate_into,
         const std::string& isa) {
        const TensorType wt = parse_tensor_type(type);
        py::array w = wt == TensorType::F32   ? py::array(need_array<float>(weight, 2, "weight"))
                      : !is_quantized(wt)     ? py::array(need_array<uint16_t>(weight, 2, "weight"))
                                              : py::array(need_array<uint8_t>(weight, 2, "weight"));
        const auto xs = need_array<float>(x, 2, "x");
        const int64_t out = w.shape(0), n = xs.shape(0);
        const int64_t in = is_quantized(wt) ? w.shape(1) / block_bytes(wt) * block_elements(wt)
                                            : w.shape(1);
        if (is_quantized(wt) && w.shape(1) % block_bytes(wt) != 0) {
          throw std::invalid_argument("weight rows must be whole blocks");
        }
        if (xs.shape(1) != in) throw std::invalid_argument("x must be [n, in]");
        py::array_t<float> b;  // an empty array unless given
        if (!bias.is_none()) {
          b = need_array<float>(bias, 1, "bias");
          if (b.shape(0) != out) throw std::invalid_argument("bias must be [out]");
        }
        py::array_t<float> y({n, out});
        if (!accumulate_into.is_none()) {
          const auto y0 = need_array<float>(accumulate_into, 2, "accumulate_into");
          if (y0.shape(0) != n || y0.shape(1) != out) {
            throw std::invalid_argument("accumulate_into must be [n, out]");
          }
          std::copy(y0.data(), y0.data() + n * out, y.mutable_data());
        }
        const cpu::LinearWeights lw({{w.data(), wt, out}}, in,
                                    bias.is_none() ? nullptr : b.data());
        const cpu::Isa chosen = to_isa(isa);
        const auto mode = accumulate_into.is_none() ? cpu::Output::Overwrite
                                                    : cpu::Output::Accumulate;
        float* dst = y.mutable_data();
        {
          py::gil_scoped_release release;
          cpu::linear(pool, lw, xs.data(), n, dst, mode, chosen);
        }
        return y;
      },
      py::arg("pool"), py::arg("weight"), py::arg("type"), py::arg("bias"), py::arg("x"),
      py::arg("accumulate_into"), py::arg("isa"),
      "y = x W^T + b (+ accumulate_into); weight float32 (F32), the uint16 bits of F16/BF16, "
      "or the uint8 blocks [rows, row bytes] of a quantised type.");

  k.def(
      "time_linear",
      [](cpu::ThreadPool& pool, const py::array& weight, const std::string& type,
         const py::handle& x, const std::string& isa, int repeats) {
        const TensorType wt = parse_tensor_type(type);
        const auto xs = need_array<float>(x, 2, "x");
        const int64_t in = is_quantized(wt) ? weight.shape(1) / block_bytes(wt) * block_elements(wt)
                                            : weight.shape(1);
        if (weight.ndim() != 2 || xs.shape(1) != in) throw std::invalid_argument("x must be [n, in]");
        const cpu::LinearWeights lw({{weight.data(), wt, weight.shape(0)}}, in);
        const cpu::Isa chosen = to_isa(isa);
        std::vector<float> y(static_cast<size_t>(xs.shape(0) * weight.shape(0)));
        std::vector<double> seconds;
        py::gil_scoped_release release;
        for (int i = -1; i < std::max(1, repeats); ++i) {  // i = -1: warm-up
          const auto start = std::chrono::steady_clock::now();
          cpu::linear(pool, lw, xs.data(), xs.shape(0), y.data(), cpu::Output::Overwrite, chosen);
          const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
          if (i >= 0) seconds.push_back(took.count());
        }
        std::sort(seconds.begin(), seconds.end());
        return seconds[seconds.size() / 2];
      },
      py::arg("pool"), py::arg("weight"), py::arg("type"), py::arg("x"), py::arg("isa"),
      py::arg("repeats"),
      "The median seconds of `repeats` back-to-back calls of the linear (weights as linear()).");

  k.def(
      "dequantize",
      [](const py::handle& data, const std::string& type, int64_t count) {
        const TensorType t = parse_tensor_type(type);
        const auto bytes = py::array_t<uint8_t, py::array::c_style>::ensure(data);
        if (!bytes) throw std::invalid_argument("data must be a uint8 array");
        const int64_t needed = row_bytes(t, count, "count");
        if (bytes.size() < needed) {
          throw std::invalid_argument("data holds " + std::to_string(bytes.size()) +
                                      " bytes, " + std::to_string(needed) + " needed");
        }
        py::array_t<float> out(count);
        dequantize(t, bytes.data(), count, out.mutable_data());
        return out;
      },
      py::arg("data"), py::arg("type"), py::arg("count"),
      "The first `count` elements of blocks of `type` as float32: the reference dequantisation.");

  k.def(
      "attention",
      [](cpu::ThreadPool& pool, const py::handle& q, const py::handle& k_cache,
         const py::handle& v_cache, int pos, int num_heads, const std::string& isa,
         const std::string& cache_type) {
        const auto qs = need_array<float>(q, 2, "q");
        const TensorType type = parse_tensor_type(cache_type);
        if (type != TensorType::F32 && type != TensorType::F16) {
          throw std::invalid_argument("cache_type must be F32 or F16, got " + cache_type);
        }
        const bool f16 = type == TensorType::F16;
        const py::array ks = f16 ? py::array(need_array<uint16_t>(k_cache, 3, "k_cache"))
                                 : py::array(need_array<float>(k_cache, 3, "k_cache"));
        const py::array vs = f16 ? py::array(need_array<uint16_t>(v_cache, 3, "v_cache"))
                                 : py::array(need_array<float>(v_cache, 3, "v_cache"));
        const int n = static_cast<int>(qs.shape(0));
        const int num_kv_heads = static_cast<int>(ks.shape(0));
        const int head_dim = static_cast<int>(ks.shape(2));
        if (pos < 0 || num_heads < 1 || num_kv_heads < 1 || num_heads % num_kv_heads != 0 ||
            qs.shape(1) != static_cast<int64_t>(num_heads) * head_dim ||
            ks.shape(1) < pos + n || !std::equal(ks.shape(), ks.shape() + 3, vs.shape())) {
          throw std::invalid_argument("attention shapes do not fit");
        }
        const cpu::AttentionShape shape{num_heads, num_kv_heads, head_dim, qs.shape(1),
                                        ks.shape(1) * head_dim, type};
        py::array_t<float> out({static_cast<int64_t>(n), qs.shape(1)});
        float* dst = out.mutable_data();
        const cpu::Isa chosen = to_isa(isa);
        {
          py::gil_scoped_release release;
          cpu::attention(pool, shape, qs.data(), n, pos, ks.data(), vs.data(), dst, chosen);
        }
        return out;
      },
      py::arg("pool"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"),
      py::arg("num_heads"), py::arg("isa"), py::arg("cache_type") = "F32",
      "Causal attention of q [n, heads * head_dim] at positions pos.. over caches [kv_heads, "
      "positions, head_dim]: float32 (cache_type F32) or the uint16 bits of F16.");

  k.def(
      "rope",
      [](const py::handle& x, int pos, const py::handle& inv_freq, int heads) {
        auto xs = need_array<float>(x, 2, "x");
        const auto freqs = need_array<float>(inv_freq, 1, "inv_freq");
        const int half = static_cast<int>(freqs.shape(0));
        const int n = static_cast<int>(xs.shape(0));
        if (xs.shape(1) != static_cast<int64_t>(heads) * 2 * half) {
          throw std::invalid_argument("x must be [n, heads * 2 * len(inv_freq)]");
        }
        py::array_t<float> out({xs.shape(0), xs.shape(1)});
        std::copy(xs.data(), xs.data() + xs.size(), out.mutable_data());
        std::vector<float> cos_t(static_cast<size_t>(n) * half), sin_t(cos_t.size());
        cpu::rope_tables(freqs.data(), half, pos, n, cos_t.data(), sin_t.data());
        cpu::apply_rope(out.mutable_data(), n, xs.shape(1), heads, 2 * half, cos_t.data(),
                        sin_t.data());
        return out;
      },
      py::arg("x"), py::arg("pos"), py::arg("inv_freq"), py::arg("heads"),
      "Rotate-half RoPE of rows at positions pos, pos + 1, ...");

  k.def(
      "rms_norm",
      [](const py::handle& x, const py::handle& weight, float eps) {
        const auto xs = need_array<float>(x, 2, "x");
        const auto ws = need_array<float>(weight, 1, "weight");
        if (ws.shape(0) != xs.shape(1)) throw std::invalid_argument("weight must be [dim]");
        py::array_t<float> out({xs.shape(0), xs.shape(1)});
        cpu::rms_norm(xs.data(), ws.data(), xs.shape(0), xs.shape(1), eps, out.mutable_data());
        return out;
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"));

  k.def(
      "swiglu",
      [](cpu::ThreadPool& pool, const py::handle& gate_up, const std::string& isa) {
        const auto g = need_array<float>(gate_up, 2, "gate_up");
        if (g.shape(1) % 2 != 0) throw std::invalid_argument("gate_up must be [n, 2 * inter]");
        const int64_t inter = g.shape(1) / 2;
        py::array_t<float> out({g.shape(0), inter});
        cpu::swiglu(pool, g.data(), g.shape(0), inter, out.mutable_data(), to_isa(isa));
        return out;
      },
      py::arg("pool"), py::arg("gate_up"), py::arg("isa"),
      "silu(gate) * up of the stacked [gate | up] rows.");

  k.def(
      "cosine",
      [](const py::handle& a, const py::handle& b, const std::string& isa) {
        const auto as = need_array<float>(a, 1, "a");
        const auto bs = need_array<float>(b, 1, "b");
        if (as.shape(0) != bs.shape(0)) throw std::invalid_argument("a and b differ in length");
        const cpu::Isa chosen = to_isa(isa);
        const int64_t n = as.shape(0);
        return cosine_from_sums(cpu::dot(as.data(), bs.data(), n, chosen),
                                cpu::dot(as.data(), as.data(), n, chosen),
                                cpu::dot(bs.data(), bs.data(), n, chosen));
      },
      py::arg("a"), py::arg("b"), py::arg("isa"),
      "The skip score cos(a, b) from fp32 dot products, as the CPU backend computes it.");
}

// Columns of a weight array: blocks of a quantised type as uint8 [rows, row bytes], or floats.
int64_t weight_columns(const py::array& weight, TensorType type) {
  if (!is_quantized(type)) return weight.shape(1);
  if (weight.shape(1) % block_bytes(type) != 0) {
    throw std::invalid_argument("weight rows must be whole blocks");
  }
  return weight.shape(1) / block_bytes(type) * block_elements(type);
}

CudaLinearOutput to_linear_output(const std::string& name) {
  if (name == "store") return CudaLinearOutput::Store;
  if (name == "accumulate") return CudaLinearOutput::Accumulate;
  if (name == "swiglu") return CudaLinearOutput::SwiGLU;
  throw std::invalid_argument("unknown output '" + name + "' (store, accumulate or swiglu)");
}

// The score kernels' call: the FFN's residual add and saturation score (ffn_out) or the layer
// cosine of x and b; returns the score (`score`, unchanged when skip leaves it unwritten).
float score_on_gpu(float* x, int hidden, const float* ffn_out, const float* b, bool skip,
                   float score) {
  CudaScoreCall call;
  call.x = x;
  call.ffn_out = ffn_out;
  call.b = b;
  call.hidden = hidden;
  call.skip = skip;
  call.score = &score;
  py::gil_scoped_release release;
  cuda_kernel(call);
  return score;
}

void bind_cuda_kernels(py::module_ k) {
  k.def(
      "linear",
      [](const py::array& weight, const std::string& type, const py::handle& x,
         const py::object& bias, const py::object& y0, const std::string& activation,
         const std::string& output, bool gemv, bool skip, int64_t tile_elements,
         const py::object& norm_weight, float norm_eps) {
        CudaLinearCall call;
        call.weight_type = parse_tensor_type(type);
        const py::array w = call.weight_type == TensorType::F32
                                ? py::array(need_array<float>(weight, 2, "weight"))
                                : py::array(need_array<uint8_t>(weight, 2, "weight"));
        const auto xs = need_array<float>(x, 2, "x");
        call.rows = static_cast<int>(w.shape(0));
        call.cols = static_cast<int>(weight_columns(w, call.weight_type));
        call.n = static_cast<int>(xs.shape(0));
        if (xs.shape(1) != call.cols) throw std::invalid_argument("x must be [n, cols]");
        call.output = to_linear_output(output);
        const int64_t outputs = call.output == CudaLinearOutput::SwiGLU ? call.rows / 2 : call.rows;
        py::array_t<float> b;
        if (!bias.is_none()) {
          b = need_array<float>(bias, 1, "bias");
          if (b.shape(0) != call.rows) throw std::invalid_argument("bias must be [rows]");
          call.bias = b.data();
        }
        py::array_t<float> y({static_cast<int64_t>(call.n), outputs});
        std::fill(y.mutable_data(), y.mutable_data() + y.size(), 0.0f);
        if (!y0.is_none()) {
          const auto initial = need_array<float>(y0, 2, "y0");
          if (initial.shape(0) != call.n || initial.shape(1) != outputs) {
            throw std::invalid_argument("y0 must be [n, outputs]");
          }
          std::copy(initial.data(), initial.data() + initial.size(), y.mutable_data());
        }
        call.weight = w.data();
        call.x = xs.data();
        py::array_t<float> norm;
        if (!norm_weight.is_none()) {
          norm = need_array<float>(norm_weight, 1, "norm_weight");
          if (norm.shape(0) != call.cols) throw std::invalid_argument("norm_weight must be [cols]");
          call.norm_weight = norm.data();
          call.norm_eps = norm_eps;
        }
        call.activation = parse_dtype(activation);
        call.gemv = gemv;
        call.skip = skip;
        call.tile_elements = tile_elements;
        call.y = y.mutable_data();
        py::gil_scoped_release release;
        cuda_kernel_linear(call);
        return y;
      },
      py::arg("weight"), py::arg("type"), py::arg("x"), py::arg("bias") = py::none(),
      py::arg("y0") = py::none(), py::arg("activation") = "float16",
      py::arg("output") = "store", py::arg("gemv") = true, py::arg("skip") = false,
      py::arg("tile_elements") = 0, py::arg("norm_weight") = py::none(),
      py::arg("norm_eps") = 1e-5f,
      "y of x [n, cols] through the backend's linear on the GPU: the decode GEMV (gemv, n = 1; "
      "skip sets its skip flag; norm_weight makes x the fp32 row its RMSNorm prologue "
      "normalises) or the prefill path (dequantised tiles of tile_elements and "
      "cuBLAS; for blocks and n <= 8, the block GEMV per token). weight: uint8 blocks [rows, row bytes] of Q8_0, Q5_0, Q4_K or Q6_K, or float32 "
      "[rows, cols] (type F32, rounded to the activation dtype). output: store (y = xW^T + b), "
      "accumulate (y = y0 + xW^T + b) or swiglu ([n, rows / 2], rounded to the activation "
      "dtype); y starts as y0 (zeros when None).");

  k.def(
      "dequantize",
      [](const py::array& data, const std::string& type, const std::string& dtype) {
        CudaDequantizeCall call;
        call.type = parse_tensor_type(type);
        const auto blocks = need_array<uint8_t>(data, 2, "data");
        call.rows = static_cast<int>(blocks.shape(0));
        call.cols = static_cast<int>(weight_columns(blocks, call.type));
        call.data = blocks.data();
        call.out_type = parse_dtype(dtype);
        py::array_t<float> out({static_cast<int64_t>(call.rows), static_cast<int64_t>(call.cols)});
        call.out = out.mutable_data();
        py::gil_scoped_release release;
        cuda_kernel_dequantize(call);
        return out;
      },
      py::arg("data"), py::arg("type"), py::arg("dtype") = "float32",
      "Every row of the blocks [rows, row bytes] dequantised on the GPU into dtype (the prefill's "
      "weight tiles), widened to float32.");

  k.def(
      "embedding",
      [](const py::array& table, const std::string& type, const py::handle& ids,
         const std::string& activation, const py::object& decode_index,
         const py::kwargs& rule_args) -> py::object {
        CudaEmbeddingCall call;
        call.type = parse_tensor_type(type);
        const py::array rows = call.type == TensorType::F32
                                   ? py::array(need_array<float>(table, 2, "table"))
                                   : py::array(need_array<uint8_t>(table, 2, "table"));
        const auto tokens = need_array<int32_t>(ids, 1, "ids");
        call.table = rows.data();
        call.rows = static_cast<int>(rows.shape(0));
        call.cols = static_cast<int>(weight_columns(rows, call.type));
        call.ids = tokens.data();
        call.n = static_cast<int>(tokens.shape(0));
        call.activation = parse_dtype(activation);
        if (decode_index.is_none() && !rule_args.empty()) {
          throw std::invalid_argument(
              "the rule's keywords start a decode step: give decode_index");
        }
        const SkipRule rule = to_skip_policy(rule_args, 0).rule;
        if (!decode_index.is_none()) {
          call.rule = &rule;
          call.decode_index = decode_index.cast<int32_t>();
        }
        py::array_t<float> out({static_cast<int64_t>(call.n), static_cast<int64_t>(call.cols)});
        call.out = out.mutable_data();
        float started[4] = {};
        call.started = started;
        {
          py::gil_scoped_release release;
          cuda_kernel(call);
        }
        if (call.rule == nullptr) return py::object(std::move(out));
        py::dict state;
        state["dense_token"] = static_cast<int>(started[0]);
        state["budget"] = static_cast<int>(started[1]);
        state["in_run"] = static_cast<int>(started[2]);
        state["prev_score"] = started[3];
        return py::make_tuple(out, state);
      },
      py::arg("table"), py::arg("type"), py::arg("ids"), py::arg("activation") = "float16",
      py::arg("decode_index") = py::none(),
      "The embedding lookup of rows `ids` on the GPU into float32: table float32 [rows, cols] "
      "(type F32, rounded to the activation dtype) or blocks. With decode_index, as a decode "
      "step's first kernel: also starts that token of the rule given as policy keywords "
      "(Policy.engine_args()), returning (rows, the skip state it starts from).");

  // The kernels of a layer and of the head (kernel_calls.h): inputs the kernel reads in the
  // activation dtype are rounded to it, its outputs in that dtype widened to float32; skip sets
  // the kernel's skip flag; arrays named *0 give what an output holds before the call.
  k.def(
      "rms_norm",
      [](const py::handle& x, const py::handle& weight, float eps, const std::string& activation) {
        const auto xs = need_array<float>(x, 2, "x");
        const auto ws = need_array<float>(weight, 1, "weight");
        if (ws.shape(0) != xs.shape(1)) throw std::invalid_argument("weight must be [dim]");
        py::array_t<float> out({xs.shape(0), xs.shape(1)});
        CudaRmsNormCall call;
        call.x = xs.data();
        call.n = static_cast<int>(xs.shape(0));
        call.dim = static_cast<int>(xs.shape(1));
        call.weight = ws.data();
        call.eps = eps;
        call.activation = parse_dtype(activation);
        call.out = out.mutable_data();
        py::gil_scoped_release release;
        cuda_kernel(call);
        return out;
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("activation") = "float16",
      "RMSNorm of float32 rows [n, dim] into the activation dtype.");

  k.def(
      "rope",
      [](const py::handle& qkv, int pos, int num_heads, int kv_heads, int head_dim,
         const py::handle& inv_freq, const py::handle& k_cache0, const py::handle& v_cache0,
         bool rotate_q, bool interleaved, bool skip, const std::string& activation,
         const py::object& weight, const std::string& weight_type, const py::object& x,
         const py::object& bias, int split_row) {
        const auto rows = need_array<float>(qkv, 2, "qkv");
        const auto freqs = need_array<float>(inv_freq, 1, "inv_freq");
        const auto k0 = need_array<float>(k_cache0, 2, "k_cache0");
        const auto v0 = need_array<float>(v_cache0, 2, "v_cache0");
        const int64_t kv_dim = static_cast<int64_t>(kv_heads) * head_dim;
        if (rows.shape(1) != static_cast<int64_t>(num_heads) * head_dim + 2 * kv_dim ||
            freqs.shape(0) != head_dim / 2 || k0.shape(1) != kv_dim ||
            v0.shape(0) != k0.shape(0) || v0.shape(1) != kv_dim) {
          throw std::invalid_argument("rope shapes do not fit");
        }
        py::array_t<float> q_out({rows.shape(0), rows.shape(1)});
        py::array_t<float> k_out({k0.shape(0), kv_dim}), v_out({v0.shape(0), kv_dim});
        std::copy(rows.data(), rows.data() + rows.size(), q_out.mutable_data());
        std::copy(k0.data(), k0.data() + k0.size(), k_out.mutable_data());
        std::copy(v0.data(), v0.data() + v0.size(), v_out.mutable_data());
        CudaRopeCall call;
        call.qkv = q_out.mutable_data();
        call.n = static_cast<int>(rows.shape(0));
        call.pos = pos;
        call.num_heads = num_heads;
        call.kv_heads = kv_heads;
        call.head_dim = head_dim;
        call.rotate_q = rotate_q;
        call.inv_freq = freqs.data();
        call.interleaved = interleaved;
        call.skip = skip;
        call.activation = parse_dtype(activation);
        call.cache_rows = static_cast<int>(k0.shape(0));
        call.k_cache = k_out.mutable_data();
        call.v_cache = v_out.mutable_data();
        py::array w, xs, b;  // the fused form's inputs, kept alive for the call
        if (!weight.is_none()) {
          if (x.is_none()) throw std::invalid_argument("the fused form needs x");
          call.weight_type = parse_tensor_type(weight_type);
          w = call.weight_type == TensorType::F32
                  ? py::array(need_array<float>(weight, 2, "weight"))
                  : py::array(need_array<uint8_t>(weight, 2, "weight"));
          const int64_t projected = rows.shape(1) - (rotate_q ? 0 : num_heads * head_dim);
          xs = need_array<float>(x, 1, "x");
          call.cols = static_cast<int>(weight_columns(w, call.weight_type));
          if (w.shape(0) != projected || xs.shape(0) != call.cols) {
            throw std::invalid_argument("weight must be [projected rows, cols], x [cols]");
          }
          if (!bias.is_none()) {
            b = need_array<float>(bias, 1, "bias");
            if (b.shape(0) != projected) throw std::invalid_argument("bias must be [rows]");
            call.bias = static_cast<const float*>(b.data());
          }
          call.weight = w.data();
          call.x = static_cast<const float*>(xs.data());
          call.split_row = split_row;
        }
        {
          py::gil_scoped_release release;
          cuda_kernel(call);
        }
        return py::make_tuple(q_out, k_out, v_out);
      },
      py::arg("qkv"), py::arg("pos"), py::arg("num_heads"), py::arg("kv_heads"),
      py::arg("head_dim"), py::arg("inv_freq"), py::arg("k_cache0"), py::arg("v_cache0"),
      py::arg("rotate_q") = true, py::arg("interleaved") = false, py::arg("skip") = false,
      py::arg("activation") = "float16", py::arg("weight") = py::none(),
      py::arg("weight_type") = "F32", py::arg("x") = py::none(), py::arg("bias") = py::none(),
      py::arg("split_row") = 0,
      "(qkv, k_cache, v_cache) after RoPE of the q heads in place and the K/V write of the n "
      "tokens of qkv [n, q_dim + 2 kv_dim] at positions pos.. into the caches [rows, kv_dim]; "
      "with weight (and x [cols], bias), the decode step's fused form: x's [q; k; v] projection "
      "(the K/V rows only without rotate_q) with RoPE and the K/V write in the GEMV's epilogue, "
      "which writes only the q part of qkv (split_row > 0: two GEMVs, as weight segments).");

  k.def(
      "swiglu",
      [](const py::handle& gate_up, const py::object& act0, bool skip,
         const std::string& activation) {
        const auto g = need_array<float>(gate_up, 2, "gate_up");
        if (g.shape(1) % 2 != 0) throw std::invalid_argument("gate_up must be [n, 2 * inter]");
        py::array_t<float> act({g.shape(0), g.shape(1) / 2});
        std::fill(act.mutable_data(), act.mutable_data() + act.size(), 0.0f);
        if (!act0.is_none()) {
          const auto initial = need_array<float>(act0, 2, "act0");
          if (initial.shape(0) != act.shape(0) || initial.shape(1) != act.shape(1)) {
            throw std::invalid_argument("act0 must be [n, inter]");
          }
          std::copy(initial.data(), initial.data() + initial.size(), act.mutable_data());
        }
        CudaSwigluCall call;
        call.gate_up = g.data();
        call.n = static_cast<int>(g.shape(0));
        call.inter = static_cast<int>(g.shape(1) / 2);
        call.skip = skip;
        call.activation = parse_dtype(activation);
        call.act = act.mutable_data();
        py::gil_scoped_release release;
        cuda_kernel(call);
        return act;
      },
      py::arg("gate_up"), py::arg("act0") = py::none(), py::arg("skip") = false,
      py::arg("activation") = "float16",
      "silu(gate) * up of float32 rows [n, 2 inter] into the activation dtype.");

  k.def(
      "decode_attention",
      [](const py::handle& q, const py::handle& k_cache, const py::handle& v_cache, int pos,
         int num_heads, int kv_heads, int head_dim, int num_splits, const py::object& out0,
         bool skip, const std::string& activation) {
        const auto qs = need_array<float>(q, 1, "q");
        const auto ks = need_array<float>(k_cache, 2, "k_cache");
        const auto vs = need_array<float>(v_cache, 2, "v_cache");
        const int64_t kv_dim = static_cast<int64_t>(kv_heads) * head_dim;
        if (qs.shape(0) != static_cast<int64_t>(num_heads) * head_dim || ks.shape(1) != kv_dim ||
            vs.shape(0) != ks.shape(0) || vs.shape(1) != kv_dim) {
          throw std::invalid_argument("decode attention shapes do not fit");
        }
        py::array_t<float> out(qs.shape(0));
        std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.0f);
        if (!out0.is_none()) {
          const auto initial = need_array<float>(out0, 1, "out0");
          if (initial.shape(0) != qs.shape(0)) throw std::invalid_argument("out0 must be like q");
          std::copy(initial.data(), initial.data() + initial.size(), out.mutable_data());
        }
        CudaDecodeAttentionCall call;
        call.q = qs.data();
        call.num_heads = num_heads;
        call.kv_heads = kv_heads;
        call.head_dim = head_dim;
        call.pos = pos;
        call.num_splits = num_splits;
        call.cache_rows = static_cast<int>(ks.shape(0));
        call.k_cache = ks.data();
        call.v_cache = vs.data();
        call.skip = skip;
        call.activation = parse_dtype(activation);
        call.out = out.mutable_data();
        py::gil_scoped_release release;
        cuda_kernel(call);
        return out;
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"), py::arg("num_heads"),
      py::arg("kv_heads"), py::arg("head_dim"), py::arg("num_splits") = 1,
      py::arg("out0") = py::none(), py::arg("skip") = false, py::arg("activation") = "float16",
      "Attention of one decode token q [heads * head_dim] at position pos over cache rows "
      "0..pos, in num_splits parts of the cache.");

  k.def(
      "prefill_attention",
      [](const py::handle& q, const py::handle& k_cache, const py::handle& v_cache, int pos,
         int num_heads, int kv_heads, int head_dim, const std::string& activation) {
        const auto qs = need_array<float>(q, 2, "q");
        const auto ks = need_array<float>(k_cache, 2, "k_cache");
        const auto vs = need_array<float>(v_cache, 2, "v_cache");
        const int64_t kv_dim = static_cast<int64_t>(kv_heads) * head_dim;
        if (qs.shape(1) != static_cast<int64_t>(num_heads) * head_dim || ks.shape(1) != kv_dim ||
            vs.shape(0) != ks.shape(0) || vs.shape(1) != kv_dim) {
          throw std::invalid_argument("prefill attention shapes do not fit");
        }
        py::array_t<float> out({qs.shape(0), qs.shape(1)});
        CudaPrefillAttentionCall call;
        call.q = qs.data();
        call.n = static_cast<int>(qs.shape(0));
        call.pos = pos;
        call.num_heads = num_heads;
        call.kv_heads = kv_heads;
        call.head_dim = head_dim;
        call.cache_rows = static_cast<int>(ks.shape(0));
        call.k_cache = ks.data();
        call.v_cache = vs.data();
        call.activation = parse_dtype(activation);
        call.out = out.mutable_data();
        py::gil_scoped_release release;
        cuda_kernel(call);
        return out;
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"), py::arg("num_heads"),
      py::arg("kv_heads"), py::arg("head_dim"), py::arg("activation") = "float16",
      "Causal attention of the n tokens q [n, heads * head_dim] at positions pos.. over the "
      "cache rows.");

  k.def(
      "route",
      [](const py::handle& x, const py::handle& norm_weight, float eps, const py::handle& weight,
         float bias, float threshold_logit) {
        const auto xs = need_array<float>(x, 2, "x");
        const auto norm = need_array<float>(norm_weight, 1, "norm_weight");
        const auto ws = need_array<float>(weight, 1, "weight");
        if (norm.shape(0) != xs.shape(1) || ws.shape(0) != xs.shape(1)) {
          throw std::invalid_argument("norm_weight and weight must be [hidden]");
        }
        int32_t layer_off = 0;
        float gate = 0.0f;
        CudaRouteCall call;
        call.x = xs.data();
        call.n = static_cast<int>(xs.shape(0));
        call.hidden = static_cast<int>(xs.shape(1));
        call.norm_weight = norm.data();
        call.eps = eps;
        call.weight = ws.data();
        call.bias = bias;
        call.threshold_logit = threshold_logit;
        call.layer_off = &layer_off;
        call.gate = &gate;
        {
          py::gil_scoped_release release;
          cuda_kernel(call);
        }
        return py::make_tuple(layer_off != 0, gate);
      },
      py::arg("x"), py::arg("norm_weight"), py::arg("eps"), py::arg("weight"), py::arg("bias"),
      py::arg("threshold_logit"),
      "(routed off, gate) of FiRST's router over the layer's input rows x [n, hidden].");

  k.def(
      "residual_add_score",
      [](const py::handle& x, const py::handle& ffn_out, bool skip, float score0) {
        const auto xs = need_array<float>(x, 1, "x");
        const auto fs = need_array<float>(ffn_out, 1, "ffn_out");
        if (fs.shape(0) != xs.shape(0)) throw std::invalid_argument("ffn_out must be like x");
        py::array_t<float> x_out(xs.shape(0));
        std::copy(xs.data(), xs.data() + xs.size(), x_out.mutable_data());
        const float score = score_on_gpu(x_out.mutable_data(), static_cast<int>(xs.shape(0)),
                                         fs.data(), nullptr, skip, score0);
        return py::make_tuple(x_out, score);
      },
      py::arg("x"), py::arg("ffn_out"), py::arg("skip") = false,
      py::arg("score0") = std::numeric_limits<float>::quiet_NaN(),
      "(x + ffn_out, the FFN's saturation score cos(x, x + ffn_out) as the skip state records "
      "it) from a fresh skip state; score0 is returned when skip leaves it unwritten.");

  k.def(
      "cosine",
      [](const py::handle& a, const py::handle& b, bool skip) {
        const auto as = need_array<float>(a, 1, "a");
        const auto bs = need_array<float>(b, 1, "b");
        if (as.shape(0) != bs.shape(0)) throw std::invalid_argument("a and b differ in length");
        std::vector<float> a_copy(as.data(), as.data() + as.size());
        return score_on_gpu(a_copy.data(), static_cast<int>(as.shape(0)), nullptr, bs.data(),
                            skip, 0.0f);
      },
      py::arg("a"), py::arg("b"), py::arg("skip") = false,
      "The layer score cos(a, b) on the GPU; NaN when skip (the layer did not run).");

  k.def(
      "logits",
      [](const py::handle& x, const py::handle& final_norm, float eps, const py::array& lm_head,
         const std::string& type, const std::string& activation) {
        const auto xs = need_array<float>(x, 1, "x");
        const auto norm = need_array<float>(final_norm, 1, "final_norm");
        CudaLogitsCall call;
        call.lm_head_type = parse_tensor_type(type);
        const py::array w = call.lm_head_type == TensorType::F32
                                ? py::array(need_array<float>(lm_head, 2, "lm_head"))
                                : py::array(need_array<uint8_t>(lm_head, 2, "lm_head"));
        call.hidden = static_cast<int>(xs.shape(0));
        if (norm.shape(0) != xs.shape(0) || weight_columns(w, call.lm_head_type) != xs.shape(0)) {
          throw std::invalid_argument("final_norm must be [hidden] and lm_head [vocab, hidden]");
        }
        call.vocab = static_cast<int>(w.shape(0));
        py::array_t<float> logits(call.vocab);
        call.x = xs.data();
        call.final_norm = norm.data();
        call.eps = eps;
        call.lm_head = w.data();
        call.activation = parse_dtype(activation);
        call.logits = logits.mutable_data();
        py::gil_scoped_release release;
        cuda_kernel(call);
        return logits;
      },
      py::arg("x"), py::arg("final_norm"), py::arg("eps"), py::arg("lm_head"), py::arg("type"),
      py::arg("activation") = "float16",
      "The logits of one float32 row: the final RMSNorm into the activation dtype, then the "
      "vocabulary GEMV over lm_head (float32 [vocab, hidden], type F32, or blocks).");
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
                    py::arg("cpu_isa") = cpu::isa_name(cpu::kernel_isa()),
                    py::arg("cpu_quant_kernels") = cpu::quant_kernels_name(cpu::kernel_isa()));
  }, "CUDA build and machine: compiled or not, CUDA runtime, driver and cuBLAS versions, GPU; "
     "the instruction set of the CPU kernels (avx512, avx2 or default) and the integer "
     "dot products of its quantised linears (avx512-vnni, avx2 or scalar).");

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

  m.attr("ROUTER_PROMPT_TOKENS") = kRouterPromptTokens;
  {
    py::dict types;  // name -> (elements per block, bytes per block)
    for (const std::string& name : tensor_type_names()) {
      const TensorType t = parse_tensor_type(name);
      types[py::str(name)] = py::make_tuple(block_elements(t), block_bytes(t));
    }
    m.attr("TENSOR_TYPES") = types;
  }

  py::class_<MappedFile, std::shared_ptr<MappedFile>>(
      m, "MappedFile", py::buffer_protocol(),
      "A checkpoint file mapped read-only (a memoryview of it is zero-copy); decoders made from "
      "its tensors read them in place and keep it mapped.")
      .def(py::init([](const std::string& path) {
             return std::const_pointer_cast<MappedFile>(MappedFile::open(path));
           }),
           py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &MappedFile::path)
      .def_property_readonly("size", &MappedFile::size)
      .def_buffer([](MappedFile& f) {
        return py::buffer_info(const_cast<uint8_t*>(f.data()), 1,
                               py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {1}, /*readonly=*/true);
      });

  py::class_<TensorView>(m, "Tensor", "A tensor of a mapped file, in its stored format.")
      .def(py::init([](const std::shared_ptr<MappedFile>& file, int64_t offset,
                       const std::string& type, const std::vector<int64_t>& shape) {
             return mapped_tensor(file, offset, type, shape);
           }),
           py::arg("file"), py::arg("offset"), py::arg("type"), py::arg("shape"))
      .def_property_readonly("type", [](const TensorView& t) { return tensor_type_name(t.type); })
      .def_property_readonly("shape", [](const TensorView& t) { return py::tuple(py::cast(t.shape)); })
      .def_property_readonly("nbytes", &TensorView::bytes)
      .def("to_float",
           [](const TensorView& t) {
             py::array_t<float> out(t.shape);
             float* dst = out.mutable_data();
             {
               py::gil_scoped_release release;
               dequantize(t.type, t.data, t.numel(), dst);
             }
             return out;
           },
           "The values as a new float32 array (dequantised).");
  m.attr("POLICY_KINDS") = py::tuple(py::cast(policy_kind_names()));
  m.attr("DTYPES") = py::tuple(py::cast(dtype_names()));
  m.attr("DEVICES") = py::tuple(py::cast(device_names()));

  m.def(
      "model_tensors",
      [](const py::object& config) {
        py::list out;
        for (const TensorSpec& t : model_tensors(to_model_config(config))) {
          out.append(py::make_tuple(t.name, py::tuple(py::cast(t.shape))));
        }
        return out;
      },
      py::arg("config"),
      "[(Hugging Face name, shape)] of every tensor the engine reads for a ModelConfig.");

  m.def(
      "validate_policy",
      [](int num_layers, const py::kwargs& args) {
        to_skip_policy(args, num_layers).validate(num_layers);
      },
      py::arg("num_layers") = 0,
      "Raises ValueError naming the first invalid field of a policy (engine keyword arguments); "
      "num_layers 0 checks only what holds for any model.");

  bind_kernels(m.def_submodule(
      "kernels", "The CPU kernels one by one, for the per-kernel tests and benchmarks."));
  bind_cuda_kernels(m.def_submodule(
      "cuda_kernels",
      "The CUDA backend's kernels one by one on host arrays, for the per-kernel tests; "
      "ValueError when device='cuda' is not available."));

  py::class_<Decoder>(m, "Decoder")
      .def(py::init(&make_decoder), py::arg("config"), py::arg("weights"),
           py::arg("device") = "cpu", py::arg("dtype") = "float32", py::arg("max_seq_len") = 0,
           py::arg("num_threads") = 0, py::arg("kv_cache_dtype") = "auto")
      .def_property_readonly("dtype", [](const Decoder& d) { return dtype_name(d.dtype()); })
      .def_property_readonly("position",
                             [](const Decoder& d) {
                               py::gil_scoped_release release;  // waits for a running pass
                               return d.position();
                             })
      .def_property_readonly("max_seq_len", &Decoder::max_seq_len)
      .def_property_readonly("verifies", &Decoder::verifies)
      .def("reset", &Decoder::reset, py::call_guard<py::gil_scoped_release>())
      .def("truncate", &Decoder::truncate, py::arg("position"),
           py::call_guard<py::gil_scoped_release>())
      .def("prefill",
           [](Decoder& d, const TokenArray& tokens) {
             const std::vector<int32_t> ids = to_token_ids(tokens, d.config().vocab_size);
             if (ids.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
               throw std::invalid_argument("prompt too long");
             }
             py::array_t<float> logits(d.config().vocab_size);
             float* out = logits.mutable_data();
             PendingSignals signals;
             try {
               py::gil_scoped_release release;
               d.prefill(ids.data(), static_cast<int>(ids.size()), out, signals.check());
             } catch (const Interrupted&) {
               signals.rethrow();
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
      .def("verify",
           [](Decoder& d, const TokenArray& tokens) {
             const std::vector<int32_t> ids = to_token_ids(tokens, d.config().vocab_size);
             // More than kMaxVerifyTokens rows are never written: verify() refuses them.
             const size_t rows = std::min<size_t>(ids.size(), kMaxVerifyTokens);
             py::array_t<float> logits({static_cast<py::ssize_t>(rows),
                                        static_cast<py::ssize_t>(d.config().vocab_size)});
             float* out = logits.mutable_data();
             const int n = static_cast<int>(std::min<size_t>(ids.size(), kMaxVerifyTokens + 1));
             {
               py::gil_scoped_release release;
               d.verify(ids.data(), n, out);
             }
             return logits;
           },
           py::arg("token_ids"))
      .def("draft_step",
           [](Decoder& d, int64_t token) {
             check_token_id(token, 0, d.config().vocab_size);
             py::array_t<float> logits(d.config().vocab_size);
             float* out = logits.mutable_data();
             {
               py::gil_scoped_release release;
               d.draft_step(static_cast<int32_t>(token), out);
             }
             return logits;
           },
           py::arg("token_id"))
      .def("set_draft_policy",
           [](Decoder& d, const py::kwargs& args) {
             const SkipPolicy policy = to_skip_policy(args, d.config().num_layers);
             py::gil_scoped_release release;
             d.set_draft_policy(policy);
           })
      .def("set_policy",
           [](Decoder& d, const py::kwargs& args) {
             const SkipPolicy policy = to_skip_policy(args, d.config().num_layers);
             py::gil_scoped_release release;
             d.set_policy(policy);
           })
      .def("stats",
           [](const Decoder& d) {
             const DecodeStats s = [&] {
               py::gil_scoped_release release;
               return d.stats();
             }();
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
             out["weight_bytes_read"] = s.weight_bytes_read;
             return out;
           })
      .def_property_readonly("weight_bytes",
                             [](const Decoder& d) {
                               py::dict out;
                               for (const auto& [type, bytes] : d.weight_footprint().bytes_by_type) {
                                 out[py::str(tensor_type_name(type))] = bytes;
                               }
                               return out;
                             })
      .def_property_readonly("weight_conversions",
                             [](const Decoder& d) {
                               py::dict out;
                               for (const auto& c : d.weight_footprint().conversions) {
                                 out[py::str(c.tensor)] = py::make_tuple(
                                     tensor_type_name(c.stored), tensor_type_name(c.held));
                               }
                               return out;
                             })
      .def_property_readonly("dense_step_bytes",
                             [](const Decoder& d) { return d.weight_footprint().dense_step_bytes(); })
      .def("reset_stats", &Decoder::reset_stats, py::call_guard<py::gil_scoped_release>())
      .def("enable_trace", &Decoder::enable_trace, py::arg("enabled"),
           py::call_guard<py::gil_scoped_release>())
      .def("clear_trace", &Decoder::clear_trace, py::call_guard<py::gil_scoped_release>())
      .def("trace", [](const Decoder& d) {
        const std::vector<StepRecord> steps = [&] {
          py::gil_scoped_release release;
          return d.trace();
        }();
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
