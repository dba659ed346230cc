// Linears over quantised weights (GGUF block formats, as stored). The activations are quantised
// to int8 and each block of weights is multiplied with them in integer arithmetic (AVX2:
// vpmaddubsw/vpmaddwd; AVX-512 VNNI: vpdpbusd/vpdpwssd), fp32 across blocks: per block of 32
// with an fp32 scale for the 32-element formats, per super-block of 256 with one scale for the
// K-quants, whose sub-block scales are integers (as llama.cpp's Q8_K), so a whole super-block
// is summed in int32.
#pragma once

#include <cstdint>

#include "ffnskip/weights.h"
#include "isa.h"

namespace ffnskip::cpu {

// 32 activations: x[i] ~ d * q[i]; s[h] = d * (the sum of q over half h of 16) carries the
// weights' minimum (Q4_1/Q5_1).
struct BlockQ8 {
  float d;
  float s[2];
  int8_t q[32];
};

// 256 activations for the K-quants: x[i] ~ d * q[i]; sums[g], the sum of q over sub-block g
// of 32, carries Q4_K/Q5_K's minimums, sums16[j] over the sub-blocks of 16 Q6_K's offset -32.
struct BlockQ8K {
  float d;
  int16_t sums[8];
  int16_t sums16[16];
  int8_t q[256];
};

// The integer dot-product kernels the quantised linears run for `isa`: "avx512-vnni" (an
// AVX-512 CPU with VNNI), "avx2" (also AVX-512 without VNNI) or "scalar".
const char* quant_kernels_name(Isa isa);

// Whether a format reads BlockQ8K activations (else BlockQ8).
bool uses_k_activations(TensorType type);

// x [n, in] into n rows of in / 32 blocks (in a multiple of 32), or of in / 256 (a multiple of
// 256).
void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8* out, Isa isa);
void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8K* out, Isa isa);

// A matrix of quantised rows, each in / block_elements(type) blocks.
struct QuantMatrix {
  const void* data = nullptr;
  TensorType type = TensorType::Q8_0;
  int64_t in = 0;  // elements per row
};

// The n tokens' activations in the formats the matrices of a linear read (null where unused).
struct QuantInput {
  const BlockQ8* x32 = nullptr;
  const BlockQ8K* x256 = nullptr;
  int64_t n = 0;
};

// y[t, r] (+)= row r of w . x[t] for rows [row_begin, row_end) and t < n; y rows are y_stride
// floats apart. No bias.
void quant_rows(const QuantMatrix& w, const QuantInput& x, float* y, int64_t y_stride,
                int64_t row_begin, int64_t row_end, bool accumulate, Isa isa);

}  // namespace ffnskip::cpu
