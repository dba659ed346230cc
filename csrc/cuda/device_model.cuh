// The model's weights in device memory: where each tensor lives in the arena, and their upload
// (converted to the storage type T on the host, through a pinned staging buffer).
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "../core/model_view.h"
#include "device.cuh"
#include "ffnskip/config.h"

namespace ffnskip::cuda {

template <typename T>
struct DeviceLinear {
  T* weight = nullptr;    // [rows, cols]
  float* bias = nullptr;  // [rows] or null
  int rows = 0;
  int cols = 0;
};

template <typename T>
struct DeviceLayer {
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
  DeviceLinear<T> qkv;      // q, k, v rows stacked
  DeviceLinear<T> o;
  DeviceLinear<T> gate_up;  // gate rows, then up rows (the CPU backend's layout)
  DeviceLinear<T> down;
};

template <typename T>
struct DeviceModel {
  T* embed = nullptr;
  T* lm_head = nullptr;  // the embedding table when tied
  float* final_norm = nullptr;
  float* inv_freq = nullptr;
  std::vector<DeviceLayer<T>> layers;

  // Takes every weight piece from `arena` (see Arena: once to measure, once to place).
  void carve(Arena& arena, const ModelConfig& config, const ModelView& model);
  // Copies `model` into the carved pieces; returns when the copies are done.
  void upload(const ModelConfig& config, const ModelView& model, cudaStream_t stream) const;
};

}  // namespace ffnskip::cuda
