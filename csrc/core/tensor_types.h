// The storage formats of checkpoint tensors (GGUF's block quantisations among them), their sizes
// and the reference dequantisation every backend and test agrees with. Block layouts are those
// of GGUF files (llama.cpp's ggml): little-endian, a row of `cols` elements is cols / block
// elements consecutive blocks.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ffnskip/weights.h"

namespace ffnskip {

struct BlockQ4_0 {
  uint16_t d;  // fp16 scale
  uint8_t qs[16];  // element j in the low nibble of qs[j], element j + 16 in its high nibble
};
struct BlockQ4_1 {
  uint16_t d, m;  // fp16 scale and minimum
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];  // bit j: the fifth bit of element j
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
// K-quants: super-blocks of 256 elements.
struct BlockQ4_K {
  uint16_t d, dmin;    // fp16 scales of the sub-block scales and minimums
  uint8_t scales[12];  // 8 sub-blocks of 32: 6-bit scale and 6-bit minimum each
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];  // low 4 bits
  uint8_t qh[64];   // high 2 bits
  int8_t scales[16];  // 16 sub-blocks of 16
  uint16_t d;
};
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
                  sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_K) == 144 &&
                  sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210,
              "GGUF block layouts");

// Elements per block (1 for the float types) and bytes per block.
int64_t block_elements(TensorType type);
int64_t block_bytes(TensorType type);
bool is_quantized(TensorType type);
// Bytes of a row of `cols` elements; throws std::invalid_argument naming `what` when cols is
// not a whole number of blocks.
int64_t row_bytes(TensorType type, int64_t cols, const char* what = "a row");

// The 6-bit scale and minimum of sub-block j (0..7) of Q4_K and Q5_K.
void k_scale_min(const uint8_t* scales, int j, uint8_t& scale, uint8_t& min);

// `count` elements (whole blocks) of type `type` at `data` as fp32: the reference every kernel
// is tested against.
void dequantize(TensorType type, const void* data, int64_t count, float* out);

float fp16_to_float(uint16_t bits);

}  // namespace ffnskip
