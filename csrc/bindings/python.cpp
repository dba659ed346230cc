// pybind11 bindings: conversions between Python/NumPy and the C++ core, nothing else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

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

std::unique_ptr<Decoder> make_decoder(const py::object& config, const py::dict& weights,
                                      const std::string& device, int max_seq_len,
                                      int num_threads) {
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
  options.max_seq_len = max_seq_len;
  options.num_threads = num_threads;
  const ModelConfig model_config = to_model_config(config);
  py::gil_scoped_release release;
  return std::make_unique<Decoder>(model_config, views, options);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ffnskip_ext native engine";

  py::class_<Decoder>(m, "Engine")
      .def(py::init(&make_decoder), py::arg("config"), py::arg("weights"),
           py::arg("device") = "cpu", py::arg("max_seq_len") = 0, py::arg("num_threads") = 0)
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
           py::arg("token_id"));
}
