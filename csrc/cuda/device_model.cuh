// The model's weights in device memory: where each tensor lives in the arena, in which type, and
// their upload (through a pinned staging buffer).
//
// A weight matrix is held in the backend's storage type T, or, with dtype "auto", in the GGUF
// block format it is stored in when the kernels read that format in place (Q8_0, Q5_0, Q4_K,
// Q6_K: block_formats.cuh), its bytes unchanged; every other stored type is converted to T.
// The parts of a stacked linear (q, k, v; gate, up) may differ in type, as in llama.cpp's mixed
// quantisations (attn_v Q6_K beside attn_q Q4_K): a linear is a list of row segments of one
// type each, and the kernels run once per segment.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "../core/model_view.h"
#include "device.cuh"
#include "ffnskip/config.h"
#include "ffnskip/decoder.h"

namespace ffnskip::cuda {

// Consecutive rows of a weight matrix in one storage type.
struct WeightSegment {
  void* data = nullptr;  // rows * row_bytes
  TensorType type = TensorType::F32;
  int first_row = 0;  // within the linear
  int rows = 0;
  int64_t row_bytes = 0;

  int64_t bytes() const { return rows * row_bytes; }
};

// A linear's weight [rows, cols]: its parts stacked row-wise, neighbouring parts of the same
// type in one segment; the fp32 bias of all rows, or null.
struct DeviceLinear {
  static constexpr int kMaxSegments = 3;  // q, k, v
  WeightSegment segments[kMaxSegments];
  int num_segments = 0;
  float* bias = nullptr;
  int rows = 0;
  int cols = 0;

  // Weight bytes of rows [begin, end).
  int64_t bytes(int begin, int end) const;
  int64_t bytes() const { return bytes(0, rows); }
  // The linear of rows [first_row, rows) (the K/V rows of qkv).
  DeviceLinear rows_from(int first_row) const;
};

struct DeviceLayer {
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
  DeviceLinear qkv;      // q, k, v rows stacked
  DeviceLinear o;
  DeviceLinear gate_up;  // gate rows, then up rows (the CPU backend's layout)
  DeviceLinear down;
};

template <typename T>
struct DeviceModel {
  WeightSegment embed;    // [vocab, hidden]
  WeightSegment lm_head;  // the embedding table when tied
  float* final_norm = nullptr;
  float* inv_freq = nullptr;
  std::vector<DeviceLayer> layers;

  // The type a weight matrix stored as `stored` is held in, for the requested dtype.
  static TensorType held_type(TensorType stored, DType requested);

  // Takes every weight piece from `arena` (see Arena: once to measure, once to place).
  void carve(Arena& arena, const ModelConfig& config, const ModelView& model, DType requested);
  // Copies `model` into the carved pieces; returns when the copies are done.
  void upload(const ModelConfig& config, const ModelView& model, cudaStream_t stream) const;
  // The elements of T the GEMMs over block formats need (gemm.cuh's gemm_scratch_elements for
  // the largest: a prefill's dequantised tiles, a verification's int8 activations; 0 when no
  // matrix is held in a block format).
  int64_t gemm_scratch_elements(int hidden_size) const;
};

}  // namespace ffnskip::cuda
