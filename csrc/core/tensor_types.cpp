#include "tensor_types.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "half.h"

namespace ffnskip {

namespace {

struct TypeInfo {
  const char* name;
  int64_t elements;  // per block
  int64_t bytes;     // per block
};

// In TensorType order.
constexpr TypeInfo kTypes[] = {
    {"F32", 1, 4},
    {"F16", 1, 2},
    {"BF16", 1, 2},
    {"Q8_0", 32, sizeof(BlockQ8_0)},
    {"Q4_0", 32, sizeof(BlockQ4_0)},
    {"Q4_1", 32, sizeof(BlockQ4_1)},
    {"Q5_0", 32, sizeof(BlockQ5_0)},
    {"Q5_1", 32, sizeof(BlockQ5_1)},
    {"Q4_K", 256, sizeof(BlockQ4_K)},
    {"Q5_K", 256, sizeof(BlockQ5_K)},
    {"Q6_K", 256, sizeof(BlockQ6_K)},
};

const TypeInfo& info(TensorType type) { return kTypes[static_cast<size_t>(type)]; }

// The fifth bit of element j (0..31) of a Q5_0/Q5_1 block, at bit position 4.
inline int high_bit(const uint8_t* qh, int j) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  return static_cast<int>((bits >> j) & 1u) << 4;
}

template <typename Block>
void dequantize_32(const Block* blocks, int64_t count, float* out) {
  for (int64_t b = 0; b < count; ++b, out += 32) {
    const Block& blk = blocks[b];
    const float d = fp16_to_float(blk.d);
    if constexpr (std::is_same_v<Block, BlockQ8_0>) {
      for (int j = 0; j < 32; ++j) out[j] = d * blk.qs[j];
    } else {
      for (int j = 0; j < 16; ++j) {
        int lo = blk.qs[j] & 0xF, hi = blk.qs[j] >> 4;
        if constexpr (std::is_same_v<Block, BlockQ5_0> || std::is_same_v<Block, BlockQ5_1>) {
          lo |= high_bit(blk.qh, j);
          hi |= high_bit(blk.qh, j + 16);
        }
        if constexpr (std::is_same_v<Block, BlockQ4_1> || std::is_same_v<Block, BlockQ5_1>) {
          const float m = fp16_to_float(blk.m);
          out[j] = d * lo + m;
          out[j + 16] = d * hi + m;
        } else {
          const int offset = std::is_same_v<Block, BlockQ5_0> ? 16 : 8;
          out[j] = d * (lo - offset);
          out[j + 16] = d * (hi - offset);
        }
      }
    }
  }
}

// Q4_K and Q5_K: each 64 elements are two sub-blocks of 32, the low then the high nibbles of
// 32 bytes; Q5_K's fifth bits are bits 2i and 2i + 1 of qh for the i-th pair of sub-blocks.
template <typename Block>
void dequantize_k4(const Block* blocks, int64_t count, float* out) {
  for (int64_t b = 0; b < count; ++b) {
    const Block& blk = blocks[b];
    const float d = fp16_to_float(blk.d), dmin = fp16_to_float(blk.dmin);
    const uint8_t* q = blk.qs;
    for (int pair = 0; pair < 4; ++pair, q += 32, out += 64) {
      uint8_t sc0, m0, sc1, m1;
      k_scale_min(blk.scales, 2 * pair, sc0, m0);
      k_scale_min(blk.scales, 2 * pair + 1, sc1, m1);
      for (int l = 0; l < 32; ++l) {
        int lo = q[l] & 0xF, hi = q[l] >> 4;
        if constexpr (std::is_same_v<Block, BlockQ5_K>) {
          lo |= ((blk.qh[l] >> (2 * pair)) & 1) << 4;
          hi |= ((blk.qh[l] >> (2 * pair + 1)) & 1) << 4;
        }
        out[l] = d * sc0 * lo - dmin * m0;
        out[32 + l] = d * sc1 * hi - dmin * m1;
      }
    }
  }
}

void dequantize_q6_k(const BlockQ6_K* blocks, int64_t count, float* out) {
  for (int64_t b = 0; b < count; ++b) {
    const BlockQ6_K& blk = blocks[b];
    const float d = fp16_to_float(blk.d);
    const uint8_t* ql = blk.ql;
    const uint8_t* qh = blk.qh;
    const int8_t* sc = blk.scales;
    for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, out += 128) {
      for (int l = 0; l < 32; ++l) {
        const int s = l / 16;
        const int q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * sc[s] * q1;
        out[l + 32] = d * sc[s + 2] * q2;
        out[l + 64] = d * sc[s + 4] * q3;
        out[l + 96] = d * sc[s + 6] * q4;
      }
    }
  }
}

}  // namespace

const std::vector<std::string>& tensor_type_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const TypeInfo& t : kTypes) out.emplace_back(t.name);
    return out;
  }();
  return names;
}

const char* tensor_type_name(TensorType type) { return info(type).name; }

TensorType parse_tensor_type(const std::string& name) {
  const auto& names = tensor_type_names();
  const auto it = std::find(names.begin(), names.end(), name);
  if (it == names.end()) {
    throw std::invalid_argument("unsupported tensor type '" + name + "'");
  }
  return static_cast<TensorType>(it - names.begin());
}

int64_t block_elements(TensorType type) { return info(type).elements; }
int64_t block_bytes(TensorType type) { return info(type).bytes; }
bool is_quantized(TensorType type) { return info(type).elements > 1; }

int64_t row_bytes(TensorType type, int64_t cols, const char* what) {
  const TypeInfo& t = info(type);
  if (cols % t.elements != 0) {
    throw std::invalid_argument(std::string(what) + " of " + std::to_string(cols) +
                                " elements is not a whole number of " + t.name + " blocks (" +
                                std::to_string(t.elements) + " elements each)");
  }
  return cols / t.elements * t.bytes;
}

void k_scale_min(const uint8_t* q, int j, uint8_t& scale, uint8_t& min) {
  if (j < 4) {
    scale = q[j] & 63;
    min = q[j + 4] & 63;
  } else {
    scale = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    min = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

float fp16_to_float(uint16_t bits) { return f16_to_float(bits); }

void dequantize(TensorType type, const void* data, int64_t count, float* out) {
  const int64_t blocks = count / block_elements(type);
  switch (type) {
    case TensorType::F32:
      std::memcpy(out, data, sizeof(float) * count);
      return;
    case TensorType::F16: {
      const auto* h = static_cast<const uint16_t*>(data);
      for (int64_t i = 0; i < count; ++i) out[i] = f16_to_float(h[i]);
      return;
    }
    case TensorType::BF16: {
      const auto* h = static_cast<const uint16_t*>(data);
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_float(h[i]);
      return;
    }
    case TensorType::Q8_0: return dequantize_32(static_cast<const BlockQ8_0*>(data), blocks, out);
    case TensorType::Q4_0: return dequantize_32(static_cast<const BlockQ4_0*>(data), blocks, out);
    case TensorType::Q4_1: return dequantize_32(static_cast<const BlockQ4_1*>(data), blocks, out);
    case TensorType::Q5_0: return dequantize_32(static_cast<const BlockQ5_0*>(data), blocks, out);
    case TensorType::Q5_1: return dequantize_32(static_cast<const BlockQ5_1*>(data), blocks, out);
    case TensorType::Q4_K: return dequantize_k4(static_cast<const BlockQ4_K*>(data), blocks, out);
    case TensorType::Q5_K: return dequantize_k4(static_cast<const BlockQ5_K*>(data), blocks, out);
    case TensorType::Q6_K:
      return dequantize_q6_k(static_cast<const BlockQ6_K*>(data), blocks, out);
  }
}

}  // namespace ffnskip
