// Rotary position embedding: the rotate-half layout of transformers' LLaMA, or adjacent pairs
// (llama.cpp's row order of Q and K in GGUF files).
#pragma once

#include <cstdint>

namespace ffnskip::cpu {

// cos/sin tables [n, head_dim / 2] for positions pos .. pos + n - 1.
void rope_tables(const float* inv_freq, int half, int pos, int n, float* cos_out, float* sin_out);

// Rotates each head of x ([n, heads, head_dim], rows `stride` floats apart) in place: element i
// with element i + head_dim / 2, or with interleaved, element 2i with 2i + 1, by angle i.
void apply_rope(float* x, int64_t n, int64_t stride, int heads, int head_dim, const float* cos_t,
                const float* sin_t, bool interleaved = false);

}  // namespace ffnskip::cpu
