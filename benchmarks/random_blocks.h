// Random weights for the benchmarks, the same for any number of filling threads: F32, F16 or
// BF16 values, or rows of a GGUF block format the CUDA kernels read in place (Q8_0, Q5_0, Q4_K,
// Q6_K) made of random bytes (every bit pattern of the quants and sub-block scales) with each
// block's fp16 scales set so that the weights are of the order of `scale`. The timings do not
// depend on the values; finite ones of a plausible size keep the activations finite. Plain C++
// (bench_decode, bench_gemv).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../csrc/core/half.h"
#include "../csrc/core/skip_rule.h"  // mix_hash
#include "../csrc/core/tensor_types.h"

namespace ffnskip::bench {

// Runs fill(begin, end) over [0, n) split among the hardware threads.
inline void parallel_for(size_t n, const std::function<void(size_t, size_t)>& fill) {
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] { fill(n * t / threads, n * (t + 1) / threads); });
  }
  for (auto& thread : pool) thread.join();
}

// `count` uniform values in [-scale, scale) from a counter-based hash of (seed, index), written
// to `out` as F32, F16 or BF16: made in the type a backend holds, so nothing is converted.
inline void fill_uniform(TensorType type, size_t count, uint64_t seed, float scale, void* out) {
  if (type != TensorType::F32 && type != TensorType::F16 && type != TensorType::BF16) {
    throw std::invalid_argument(std::string("no uniform values of ") + tensor_type_name(type));
  }
  parallel_for(count, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      const uint64_t bits = mix_hash(seed ^ mix_hash(i));
      const float unit = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // [0, 1)
      const float value = scale * (2.0f * unit - 1.0f);
      if (type == TensorType::F32) {
        static_cast<float*>(out)[i] = value;
      } else {
        static_cast<uint16_t*>(out)[i] =
            type == TensorType::F16 ? float_to_f16(value) : float_to_bf16(value);
      }
    }
  });
}

// IEEE fp16 bits of 0 < v < 65504, subnormals included (truncated: only the size matters).
inline uint16_t fp16_bits(float v) {
  if (v < std::ldexp(1.0f, -14)) return static_cast<uint16_t>(v * std::ldexp(1.0f, 24));
  int exponent = 0;
  const float mantissa = std::frexp(v, &exponent);  // v = mantissa * 2^exponent, [0.5, 1)
  return static_cast<uint16_t>(((exponent + 14) << 10) |
                               (static_cast<int>(mantissa * 2048.0f) & 0x3ff));
}

struct BlockScales {
  int64_t elements, bytes;
  int d_at;
  float d_per_scale;  // d = scale * d_per_scale: |q| (times |sc|) of order 1 / d_per_scale
  int dmin_at;        // -1: none
  float dmin_per_scale;
};

inline BlockScales block_scales(TensorType type) {
  switch (type) {
    case TensorType::Q8_0: return {32, sizeof(BlockQ8_0), 0, 1.0f / 64, -1, 0};
    case TensorType::Q5_0: return {32, sizeof(BlockQ5_0), 0, 1.0f / 8, -1, 0};
    case TensorType::Q4_K: return {256, sizeof(BlockQ4_K), 0, 1.0f / 256, 2, 1.0f / 64};
    case TensorType::Q6_K:
      return {256, sizeof(BlockQ6_K), static_cast<int>(offsetof(BlockQ6_K, d)), 1.0f / 1024,
              -1, 0};
    default:
      throw std::invalid_argument(std::string("no random blocks of ") + tensor_type_name(type));
  }
}

// Bytes of `rows` rows of `cols` elements (whole blocks) in a native block format.
inline size_t block_format_bytes(TensorType type, int64_t rows, int64_t cols) {
  const BlockScales f = block_scales(type);
  if (cols % f.elements != 0) {
    throw std::invalid_argument("rows of " + std::to_string(cols) + " elements are not whole " +
                                tensor_type_name(type) + " blocks");
  }
  return static_cast<size_t>(rows * (cols / f.elements) * f.bytes);
}

// Fills out[0, block_format_bytes(type, rows, cols)).
inline void fill_random_blocks(TensorType type, int64_t rows, int64_t cols, uint64_t seed,
                               float scale, uint8_t* out) {
  const BlockScales f = block_scales(type);
  const size_t blocks = block_format_bytes(type, rows, cols) / f.bytes;
  const uint16_t d = fp16_bits(scale * f.d_per_scale);
  const uint16_t dmin = f.dmin_at >= 0 ? fp16_bits(scale * f.dmin_per_scale) : 0;
  parallel_for(blocks, [&](size_t begin, size_t end) {
    for (size_t b = begin; b < end; ++b) {
      uint8_t* block = out + b * f.bytes;
      for (int64_t i = 0; i < f.bytes; i += 8) {
        const uint64_t bits = mix_hash(seed ^ mix_hash(b * f.bytes + i));
        std::memcpy(block + i, &bits, static_cast<size_t>(std::min<int64_t>(8, f.bytes - i)));
      }
      std::memcpy(block + f.d_at, &d, sizeof(d));
      if (f.dmin_at >= 0) std::memcpy(block + f.dmin_at, &dmin, sizeof(dmin));
    }
  });
}

}  // namespace ffnskip::bench
