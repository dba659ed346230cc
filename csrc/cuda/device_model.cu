#include "device_model.cuh"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../core/tensor_types.h"
#include "../cpu/thread_pool.h"
#include "block_formats.cuh"
#include "common.cuh"
#include "cuda_check.cuh"
#include "gemm.cuh"

namespace ffnskip::cuda {

namespace {

constexpr size_t kUploadStagingBytes = 64u << 20;

bool has_bias(std::initializer_list<const LinearView*> parts) {
  return std::any_of(parts.begin(), parts.end(),
                     [](const LinearView* p) { return p->bias.data != nullptr; });
}

WeightSegment segment_piece(Arena& arena, TensorType type, int rows, int cols) {
  WeightSegment s;
  s.type = type;
  s.rows = rows;
  s.row_bytes = row_bytes(type, cols);
  s.data = arena.take<uint8_t>(static_cast<size_t>(s.bytes()));
  return s;
}

template <typename T>
DeviceLinear linear_piece(Arena& arena, std::initializer_list<const LinearView*> parts,
                          DType requested) {
  DeviceLinear l;
  l.cols = static_cast<int>((*parts.begin())->weight.shape.back());
  for (const LinearView* p : parts) {
    const TensorType type = DeviceModel<T>::held_type(p->weight.type, requested);
    const int rows = static_cast<int>(p->weight.shape[0]);
    if (l.num_segments > 0 && l.segments[l.num_segments - 1].type == type) {
      l.segments[l.num_segments - 1].rows += rows;
    } else {
      WeightSegment& s = l.segments[l.num_segments++];
      s.type = type;
      s.first_row = l.rows;
      s.rows = rows;
    }
    l.rows += rows;
  }
  for (int i = 0; i < l.num_segments; ++i) {
    WeightSegment& s = l.segments[i];
    s.row_bytes = row_bytes(s.type, l.cols);
    s.data = arena.take<uint8_t>(static_cast<size_t>(s.bytes()));
  }
  l.bias = has_bias(parts) ? arena.take<float>(l.rows) : nullptr;
  return l;
}

// The segment of `linear` that holds row `row`.
const WeightSegment& segment_of(const DeviceLinear& linear, int row) {
  int i = 0;
  while (row >= linear.segments[i].first_row + linear.segments[i].rows) ++i;
  return linear.segments[i];
}

}  // namespace

int64_t DeviceLinear::bytes(int begin, int end) const {
  int64_t total = 0;
  for (int i = 0; i < num_segments; ++i) {
    const WeightSegment& s = segments[i];
    const int overlap = std::min(end, s.first_row + s.rows) - std::max(begin, s.first_row);
    if (overlap > 0) total += overlap * s.row_bytes;
  }
  return total;
}

DeviceLinear DeviceLinear::rows_from(int first_row) const {
  DeviceLinear out;
  out.rows = rows - first_row;
  out.cols = cols;
  out.bias = bias != nullptr ? bias + first_row : nullptr;
  for (int i = 0; i < num_segments; ++i) {
    const WeightSegment& s = segments[i];
    const int begin = std::max(first_row, s.first_row), end = s.first_row + s.rows;
    if (begin >= end) continue;
    WeightSegment& part = out.segments[out.num_segments++];
    part = s;
    part.data = static_cast<uint8_t*>(s.data) + (begin - s.first_row) * s.row_bytes;
    part.first_row = begin - first_row;
    part.rows = end - begin;
  }
  return out;
}

template <typename T>
TensorType DeviceModel<T>::held_type(TensorType stored, DType requested) {
  return requested == DType::Auto && is_native_block_format(stored) ? stored
                                                                     : dense_tensor_type<T>();
}

template <typename T>
void DeviceModel<T>::carve(Arena& arena, const ModelConfig& c, const ModelView& model,
                           DType requested) {
  const int hidden = c.hidden_size;
  embed = segment_piece(arena, held_type(model.embed.type, requested), c.vocab_size, hidden);
  lm_head = c.tie_word_embeddings
                ? embed
                : segment_piece(arena, held_type(model.lm_head.type, requested), c.vocab_size,
                                hidden);
  final_norm = arena.take<float>(hidden);
  inv_freq = arena.take<float>(c.head_dim / 2);
  layers.assign(c.num_layers, DeviceLayer{});
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerView& v = model.layers[l];
    DeviceLayer& d = layers[l];
    d.attn_norm = arena.take<float>(hidden);
    d.ffn_norm = arena.take<float>(hidden);
    d.qkv = linear_piece<T>(arena, {&v.q, &v.k, &v.v}, requested);
    d.o = linear_piece<T>(arena, {&v.o}, requested);
    d.gate_up = linear_piece<T>(arena, {&v.gate, &v.up}, requested);
    d.down = linear_piece<T>(arena, {&v.down}, requested);
  }
}

template <typename T>
int64_t DeviceModel<T>::gemm_scratch_elements(int hidden_size) const {
  int64_t elements = 0;
  auto need = [&](const WeightSegment& s, int cols) {
    if (!is_native_block_format(s.type)) return;
    elements = std::max(elements,
                        cuda::gemm_scratch_elements<T>(s.type, s.rows, cols, kGemmTileElements));
  };
  for (const DeviceLayer& layer : layers) {
    for (const DeviceLinear* linear : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) {
      for (int i = 0; i < linear->num_segments; ++i) need(linear->segments[i], linear->cols);
    }
  }
  need(lm_head, hidden_size);  // a verification's logits
  return elements;
}

template <typename T>
void DeviceModel<T>::upload(const ModelConfig& c, const ModelView& model,
                            cudaStream_t stream) const {
  const int64_t hidden = c.hidden_size;
  const int64_t widest = std::max<int64_t>({hidden, c.q_dim(), c.intermediate_size});
  // A row of any held type fits: block formats take fewer bytes per element than T.
  const size_t staging_bytes = std::max(kUploadStagingBytes, sizeof(T) * widest);
  // Two staging buffers: the host fills one while the other is copied. Dequantising and
  // rounding run on every core: on one, converting a 7B fp32 checkpoint takes longer than its
  // copy over PCIe.
  PinnedMemory staging[2] = {make_pinned(staging_bytes), make_pinned(staging_bytes)};
  Event copied[2] = {make_event(), make_event()};
  int next_staging = 0;
  cpu::ThreadPool pool(0);

  // Copies the rows of a host matrix to `dst` in `type`: its own bytes when it is held as
  // stored, else dequantised and rounded to T.
  auto upload_matrix = [&](void* dst, TensorType type, const TensorView& part) {
    const int64_t cols = part.shape.back();
    const int64_t rows = part.numel() / cols;
    const int64_t in_row = row_bytes(part.type, cols), out_row = row_bytes(type, cols);
    const int64_t rows_per_chunk =
        std::max<int64_t>(1, static_cast<int64_t>(staging_bytes) / out_row);
    uint8_t* out = static_cast<uint8_t*>(dst);
    for (int64_t r0 = 0; r0 < rows; r0 += rows_per_chunk) {
      const int64_t count = std::min(rows_per_chunk, rows - r0);
      const uint8_t* src = static_cast<const uint8_t*>(part.data) + r0 * in_row;
      const int b = next_staging;
      next_staging ^= 1;
      CUDA_CHECK(cudaEventSynchronize(copied[b].get()));  // its last copy has left the buffer
      uint8_t* stage = reinterpret_cast<uint8_t*>(staging[b].get());
      pool.parallel_for(count, [&](int64_t begin, int64_t end, int) {
        if (type == part.type) {
          std::memcpy(stage + begin * out_row, src + begin * in_row,
                      static_cast<size_t>((end - begin) * out_row));
          return;
        }
        std::vector<float> values(static_cast<size_t>(cols));
        T* converted = reinterpret_cast<T*>(stage);
        for (int64_t r = begin; r < end; ++r) {
          dequantize(part.type, src + r * in_row, cols, values.data());
          for (int64_t c = 0; c < cols; ++c) converted[r * cols + c] = from_float<T>(values[c]);
        }
      });
      CUDA_CHECK(cudaMemcpyAsync(out, stage, static_cast<size_t>(count * out_row),
                                 cudaMemcpyHostToDevice, stream));
      CUDA_CHECK(cudaEventRecord(copied[b].get(), stream));
      out += count * out_row;
    }
  };
  auto upload_floats = [&](float* dst, const std::vector<float>& floats) {
    if (dst == nullptr) return;  // no bias
    CUDA_CHECK(cudaMemcpy(dst, floats.data(), sizeof(float) * floats.size(),
                          cudaMemcpyHostToDevice));
  };
  // The parts of a linear into its segments, and the stacked bias.
  auto upload_linear = [&](const DeviceLinear& d, std::initializer_list<const LinearView*> parts) {
    int row = 0;
    for (const LinearView* p : parts) {
      const WeightSegment& s = segment_of(d, row);
      upload_matrix(static_cast<uint8_t*>(s.data) + (row - s.first_row) * s.row_bytes, s.type,
                    p->weight);
      row += static_cast<int>(p->weight.shape[0]);
    }
    upload_floats(d.bias, stacked_bias(parts));
  };

  upload_matrix(embed.data, embed.type, model.embed);
  if (!c.tie_word_embeddings) upload_matrix(lm_head.data, lm_head.type, model.lm_head);
  upload_floats(final_norm, to_float(model.final_norm));
  upload_floats(inv_freq, rope_inv_freq(c));
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerView& v = model.layers[l];
    const DeviceLayer& d = layers[l];
    upload_floats(d.attn_norm, to_float(v.attn_norm));
    upload_floats(d.ffn_norm, to_float(v.ffn_norm));
    upload_linear(d.qkv, {&v.q, &v.k, &v.v});
    upload_linear(d.o, {&v.o});
    upload_linear(d.gate_up, {&v.gate, &v.up});
    upload_linear(d.down, {&v.down});
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));  // the staging buffers go at return
}

#define FFNSKIP_INSTANTIATE(T) template struct DeviceModel<T>;
FFNSKIP_FOR_EACH_STORAGE_TYPE(FFNSKIP_INSTANTIATE)
#undef FFNSKIP_INSTANTIATE

}  // namespace ffnskip::cuda
