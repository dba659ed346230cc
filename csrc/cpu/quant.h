// Linears over quantised weights (GGUF block formats, as stored): the activations are quantised
// per block of 32 to int8 with an fp32 scale, and each block of weights is multiplied with them
// in integer arithmetic (AVX2: vpmaddubsw/vpmaddwd), fp32 accumulation across blocks.
#pragma once

#include <cstdint>

#include "ffnskip/weights.h"
#include "isa.h"

namespace ffnskip::cpu {

// 32 activations: x[i] ~ d * q[i]; s[h] = d * (the sum of q over half h of 16) carries the
// weights' minimum and offset terms (per half: Q6_K's scales are per 16).
struct BlockQ8 {
  float d;
  float s[2];
  int8_t q[32];
};

// x [n, in] (in a multiple of 32) into n rows of in / 32 blocks.
void quantize_activations(const float* x, int64_t n, int64_t in, BlockQ8* out);

// A matrix of quantised rows, each in / block_elements(type) blocks.
struct QuantMatrix {
  const void* data = nullptr;
  TensorType type = TensorType::Q8_0;
  int64_t in = 0;  // elements per row
};

// y[t, r] (+)= row r of w . x[t] for rows [row_begin, row_end) and t < n, from the quantised
// activations xq ([n, in / 32] blocks); y rows are y_stride floats apart. No bias.
void quant_rows(const QuantMatrix& w, const BlockQ8* xq, int64_t n, float* y, int64_t y_stride,
                int64_t row_begin, int64_t row_end, bool accumulate, Isa isa);

}  // namespace ffnskip::cpu
