#include "device_model.cuh"

#include <algorithm>
#include <cstdint>

#include "../core/tensor_types.h"
#include "common.cuh"
#include "cuda_check.cuh"

namespace ffnskip::cuda {

namespace {

constexpr size_t kUploadStagingBytes = 64u << 20;

bool has_bias(std::initializer_list<const LinearView*> parts) {
  return std::any_of(parts.begin(), parts.end(),
                     [](const LinearView* p) { return p->bias.data != nullptr; });
}

template <typename T>
DeviceLinear<T> linear_piece(Arena& arena, int rows, int cols, bool bias) {
  DeviceLinear<T> l;
  l.weight = arena.take<T>(static_cast<size_t>(rows) * cols);
  l.bias = bias ? arena.take<float>(rows) : nullptr;
  l.rows = rows;
  l.cols = cols;
  return l;
}

}  // namespace

template <typename T>
void DeviceModel<T>::carve(Arena& arena, const ModelConfig& c, const ModelView& model) {
  const int hidden = c.hidden_size;
  const int q_dim = c.q_dim(), kv_dim = c.kv_dim(), inter = c.intermediate_size;
  const size_t table = static_cast<size_t>(c.vocab_size) * hidden;
  embed = arena.take<T>(table);
  lm_head = c.tie_word_embeddings ? embed : arena.take<T>(table);
  final_norm = arena.take<float>(hidden);
  inv_freq = arena.take<float>(c.head_dim / 2);
  layers.assign(c.num_layers, DeviceLayer<T>{});
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerView& v = model.layers[l];
    DeviceLayer<T>& d = layers[l];
    d.attn_norm = arena.take<float>(hidden);
    d.ffn_norm = arena.take<float>(hidden);
    d.qkv = linear_piece<T>(arena, q_dim + 2 * kv_dim, hidden, has_bias({&v.q, &v.k, &v.v}));
    d.o = linear_piece<T>(arena, hidden, q_dim, has_bias({&v.o}));
    d.gate_up = linear_piece<T>(arena, 2 * inter, hidden, has_bias({&v.gate, &v.up}));
    d.down = linear_piece<T>(arena, hidden, inter, has_bias({&v.down}));
  }
}

template <typename T>
void DeviceModel<T>::upload(const ModelConfig& c, const ModelView& model,
                            cudaStream_t stream) const {
  const int64_t hidden = c.hidden_size;
  const int64_t widest = std::max<int64_t>({hidden, c.q_dim(), c.intermediate_size});
  const size_t staging_bytes = std::max(kUploadStagingBytes, sizeof(T) * widest);
  PinnedMemory staging = make_pinned(staging_bytes);
  T* stage = reinterpret_cast<T*>(staging.get());
  const int64_t stage_elements = static_cast<int64_t>(staging_bytes / sizeof(T));

  // Converts the rows of host tensors (any stored type) to T into the staging buffer and copies
  // them; `parts` are stacked row-wise into `dst`.
  std::vector<float> values;
  auto upload_rows = [&](T* dst, std::initializer_list<const TensorView*> parts) {
    for (const TensorView* part : parts) {
      const int64_t cols = part->shape.back();
      const int64_t rows = part->numel() / cols;
      const int64_t bytes_per_row = row_bytes(part->type, cols);
      const int64_t rows_per_chunk = std::max<int64_t>(1, stage_elements / cols);
      for (int64_t r0 = 0; r0 < rows; r0 += rows_per_chunk) {
        const int64_t count = std::min(rows_per_chunk, rows - r0) * cols;
        values.resize(static_cast<size_t>(count));
        dequantize(part->type, static_cast<const uint8_t*>(part->data) + r0 * bytes_per_row, count,
                   values.data());
        for (int64_t i = 0; i < count; ++i) stage[i] = from_float<T>(values[i]);
        CUDA_CHECK(cudaMemcpyAsync(dst, stage, sizeof(T) * count, cudaMemcpyHostToDevice,
                                   stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));  // the staging buffer is refilled next
        dst += count;
      }
    }
  };
  auto upload_floats = [&](float* dst, const std::vector<float>& values) {
    if (dst == nullptr) return;  // no bias
    CUDA_CHECK(cudaMemcpy(dst, values.data(), sizeof(float) * values.size(),
                          cudaMemcpyHostToDevice));
  };

  upload_rows(embed, {&model.embed});
  if (!c.tie_word_embeddings) upload_rows(lm_head, {&model.lm_head});
  upload_floats(final_norm, to_float(model.final_norm));
  upload_floats(inv_freq, rope_inv_freq(c));
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerView& v = model.layers[l];
    const DeviceLayer<T>& d = layers[l];
    upload_floats(d.attn_norm, to_float(v.attn_norm));
    upload_floats(d.ffn_norm, to_float(v.ffn_norm));
    upload_rows(d.qkv.weight, {&v.q.weight, &v.k.weight, &v.v.weight});
    upload_floats(d.qkv.bias, stacked_bias({&v.q, &v.k, &v.v}));
    upload_rows(d.o.weight, {&v.o.weight});
    upload_floats(d.o.bias, stacked_bias({&v.o}));
    upload_rows(d.gate_up.weight, {&v.gate.weight, &v.up.weight});
    upload_floats(d.gate_up.bias, stacked_bias({&v.gate, &v.up}));
    upload_rows(d.down.weight, {&v.down.weight});
    upload_floats(d.down.bias, stacked_bias({&v.down}));
  }
}

#define FFNSKIP_INSTANTIATE(T) template struct DeviceModel<T>;
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
