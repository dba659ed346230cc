// Device-side decoding of the GGUF block formats the CUDA kernels read in place: Q8_0, Q5_0,
// Q4_K and Q6_K (ggml's layouts, csrc/core/tensor_types.h). Other formats are converted to the
// backend's storage type at upload (device_model.cuh).
//
// Several threads read one block, each one chunk of it: chunk c holds kRuns runs of kRunLength
// consecutive elements, run r starting at element run_start(c, r) of the block. read() loads a
// chunk (its quants as words of int8 or of small unsigned integers, its scales); decode() gives
// its weights in fp32 with the CPU reference's formula (dequantize(), up to fused
// multiply-adds), for the dequantisation and the embedding lookup; dot() its dot product with
// int8 activations (QuantizedBlock: one scale per block of kElements, as the CPU backend's
// BlockQ8 and BlockQ8K) in integer arithmetic, the scales applied once per run, for the block
// GEMVs. Neighbouring chunks are neighbouring bytes, so a warp reads whole blocks, and
// runs start at multiples of their length, so that the activations of a run are one aligned
// load (load_run, load_activation_words).
//
// Blocks are only as aligned as their size allows: rows start at 256-byte aligned arena pieces,
// so 34-byte Q8_0, 22-byte Q5_0 and 210-byte Q6_K blocks are 2-byte aligned and their 32-bit
// words are read as two 16-bit halves; 144-byte Q4_K blocks are 16-byte aligned.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../core/tensor_types.h"
#include "common.cuh"

namespace ffnskip::cuda {

// ---- loads ----

// The decoding of a block also compiles for the host, where tests/test_cuda_block_formats.py
// checks it without a GPU (tests/cuda_host/decode_blocks.cu); the device reads through the
// read-only data cache.
#define FFNSKIP_BLOCK_HD __host__ __device__ __forceinline__
// Loops of the decoding unrolled on the device (the host compiler does not know the pragma).
#ifdef __CUDA_ARCH__
#define FFNSKIP_BLOCK_UNROLL _Pragma("unroll")
#else
#define FFNSKIP_BLOCK_UNROLL
#endif

template <typename U>
FFNSKIP_BLOCK_HD uint32_t load_cached(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const U*>(p));
#else
  U v;
  std::memcpy(&v, p, sizeof(U));
  return v;
#endif
}

FFNSKIP_BLOCK_HD uint32_t load_u8(const uint8_t* p) { return load_cached<unsigned char>(p); }

FFNSKIP_BLOCK_HD uint32_t load_u16(const uint8_t* p) { return load_cached<unsigned short>(p); }

// The little-endian 32-bit word at p, which is kAlignment-byte aligned (2 or 4).
template <int kAlignment>
FFNSKIP_BLOCK_HD uint32_t load_u32(const uint8_t* p) {
  static_assert(kAlignment == 2 || kAlignment == 4, "blocks are 2- or 4-byte aligned");
  if constexpr (kAlignment == 4) {
    return load_cached<unsigned int>(p);
  } else {
    return load_u16(p) | (load_u16(p + 2) << 16);
  }
}

// The four little-endian words of the 16-byte aligned bytes at p, in one load.
FFNSKIP_BLOCK_HD void load_u32x4(const uint8_t* p, uint32_t (&words)[4]) {
#ifdef __CUDA_ARCH__
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
#else
  std::memcpy(words, p, sizeof(words));
#endif
}

FFNSKIP_BLOCK_HD float load_fp16(const uint8_t* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(load_u16(p))));
}

// Byte i (0..3) of a word.
FFNSKIP_BLOCK_HD uint32_t byte_of(uint32_t word, int i) { return (word >> (8 * i)) & 0xffu; }

FFNSKIP_BLOCK_HD float float_with_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// q - offset in fp32 for 0 <= q < 2^23, exactly, without an integer-to-float conversion (a
// quarter-rate instruction on the GPU): the float with exponent 23 and mantissa q is 2^23 + q.
FFNSKIP_BLOCK_HD float int_minus(uint32_t q, float offset) {
  return float_with_bits(0x4B000000u | q) - (8388608.0f + offset);
}

// Byte i of a word of int8 values, in fp32 (exactly, as int_minus does it).
FFNSKIP_BLOCK_HD float signed_byte_of(uint32_t word, int i) {
  return int_minus(byte_of(word, i) ^ 0x80u, 128.0f);  // the sign bit flipped: q + 128
}

// The kCount stored activations at p, widened to fp32; p is aligned to their size, which is a
// multiple of 8 bytes (16-byte loads where it is a multiple of 16); in global or shared memory
// (load_raw_anywhere).
template <typename T, int kCount>
__device__ __forceinline__ void load_run(const T* p, float (&out)[kCount]) {
  constexpr int kBytes = kCount * static_cast<int>(sizeof(T));
  static_assert(kBytes % 8 == 0, "runs of 8 bytes or more");
  constexpr int kWords = kBytes / 4;
  uint32_t words[kWords];
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      words[4 * i] = v.x;
      words[4 * i + 1] = v.y;
      words[4 * i + 2] = v.z;
      words[4 * i + 3] = v.w;
    }
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    words[0] = v.x;
    words[1] = v.y;
  }
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    if constexpr (std::is_same_v<T, float>) {
      out[w] = __uint_as_float(words[w]);
    } else if constexpr (std::is_same_v<T, __half>) {
      out[2 * w] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] & 0xffffu)));
      out[2 * w + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] >> 16)));
    } else {  // bfloat16: the upper half of the fp32 with the same bits
      out[2 * w] = __uint_as_float(words[w] << 16);
      out[2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
    }
  }
}

// ---- int8 activations ----

// c + the sum of the products of the four signed bytes of a and b (the device's dp4a).
FFNSKIP_BLOCK_HD int dot4(uint32_t a, uint32_t b, int c) {
#ifdef __CUDA_ARCH__
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int i = 0; i < 4; ++i) {
    c += static_cast<int8_t>(byte_of(a, i)) * static_cast<int8_t>(byte_of(b, i));
  }
  return c;
#endif
}

// The bytes of a minus those of b, each modulo 256 (no borrow between bytes): unsigned quants
// q into the signed bytes q - offset.
FFNSKIP_BLOCK_HD uint32_t sub_bytes(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __vsub4(a, b);
#else
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= ((byte_of(a, i) - byte_of(b, i)) & 0xffu) << (8 * i);
  return out;
#endif
}

// A block of activations as int8, the CPU backend's quantisation (quantize_block_scalar in
// csrc/cpu/quant.cpp) to the bit: amax = max |v|, q = round-to-even(v * (127 / amax)), the scale
// amax / 127 (IEEE division, so the kernels are built without fast math).
FFNSKIP_BLOCK_HD float activation_inverse_scale(float amax) {
  return amax > 0.0f ? 127.0f / amax : 0.0f;
}
FFNSKIP_BLOCK_HD float activation_scale(float amax) { return amax / 127.0f; }
FFNSKIP_BLOCK_HD int quantize_activation(float v, float inverse_scale) {
#ifdef __CUDA_ARCH__
  return __float2int_rn(v * inverse_scale);
#else
  return static_cast<int>(std::nearbyint(v * inverse_scale));
#endif
}

// The int8 activations of one block of a format's kElements (aligned to 16 bytes): x[i] ~
// scale * q[i]; sums16[j], the sum of q over elements 16j .. 16j + 15, for the formats with a
// minimum (Format::kActivationSums16).
struct QuantizedBlock {
  const int8_t* q;
  const int32_t* sums16;
};

// The kCount / 4 little-endian words of the int8 activations at p (p aligned to kCount: 4, 8 or
// 16 bytes).
template <int kCount>
FFNSKIP_BLOCK_HD void load_activation_words(const int8_t* p, uint32_t (&words)[kCount / 4]) {
  static_assert(kCount == 4 || kCount == 8 || kCount == 16, "runs of 4, 8 or 16 activations");
#ifdef __CUDA_ARCH__
  if constexpr (kCount == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
  } else if constexpr (kCount == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    words[0] = v.x, words[1] = v.y;
  } else {
    words[0] = *reinterpret_cast<const uint32_t*>(p);
  }
#else
  std::memcpy(words, p, kCount);
#endif
}

// ---- the formats ----

template <TensorType kType>
struct BlockFormat;

// Q8_0: 32 int8 times an fp16 scale. Chunk c: elements 8c .. 8c + 7.
template <>
struct BlockFormat<TensorType::Q8_0> {
  static constexpr TensorType kType = TensorType::Q8_0;
  static constexpr int kElements = 32, kBytes = sizeof(BlockQ8_0), kAlignment = 2;
  static constexpr int kChunks = 4, kRuns = 1, kRunLength = 8;
  static constexpr bool kActivationSums16 = false;
  __host__ __device__ static int run_start(int chunk, int) { return 8 * chunk; }
  struct Chunk {
    uint32_t q[2];  // int8
    float d;
  };
  __host__ __device__ static Chunk read(const uint8_t* block, int chunk) {
    const uint8_t* qs = block + 2 + 8 * chunk;
    return {{load_u32<kAlignment>(qs), load_u32<kAlignment>(qs + 4)}, load_fp16(block)};
  }
  __host__ __device__ static void decode(const uint8_t* block, int chunk,
                                         float (&w)[kRuns][kRunLength]) {
    const Chunk c = read(block, chunk);
    FFNSKIP_BLOCK_UNROLL
    for (int i = 0; i < 8; ++i) w[0][i] = c.d * signed_byte_of(c.q[i / 4], i % 4);
  }
  __host__ __device__ static float dot(const Chunk& c, int chunk, const QuantizedBlock& x) {
    uint32_t xw[2];
    load_activation_words<8>(x.q + 8 * chunk, xw);
    return c.d * static_cast<float>(dot4(c.q[0], xw[0], dot4(c.q[1], xw[1], 0)));
  }
};

// Q5_0: d * (q - 16), q = 4 low bits from qs and the fifth from qh. Chunk c: the bytes qs[4c ..
// 4c + 3], whose low nibbles are elements 4c .. 4c + 3 and high nibbles elements 16 + 4c ..
// 16 + 4c + 3; bit j of qh is the fifth bit of element j.
template <>
struct BlockFormat<TensorType::Q5_0> {
  static constexpr TensorType kType = TensorType::Q5_0;
  static constexpr int kElements = 32, kBytes = sizeof(BlockQ5_0), kAlignment = 2;
  static constexpr int kChunks = 4, kRuns = 2, kRunLength = 4;
  static constexpr bool kActivationSums16 = false;
  __host__ __device__ static int run_start(int chunk, int run) { return 4 * chunk + 16 * run; }
  // Bits 0..3 of b as bit 4 of bytes 0..3.
  __host__ __device__ static uint32_t fifth_bits(uint32_t b) {
    return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
  }
  struct Chunk {
    uint32_t q[2];  // the runs' quants less 16, int8
    float d;
  };
  __host__ __device__ static Chunk read(const uint8_t* block, int chunk) {
    const uint32_t qh = load_u32<kAlignment>(block + 2);
    const uint32_t qs = load_u32<kAlignment>(block + 6 + 4 * chunk);
    const uint32_t lo = (qs & 0x0f0f0f0fu) | fifth_bits(qh >> (4 * chunk));
    const uint32_t hi = ((qs >> 4) & 0x0f0f0f0fu) | fifth_bits(qh >> (16 + 4 * chunk));
    return {{sub_bytes(lo, 0x10101010u), sub_bytes(hi, 0x10101010u)}, load_fp16(block)};
  }
  __host__ __device__ static void decode(const uint8_t* block, int chunk,
                                         float (&w)[kRuns][kRunLength]) {
    const Chunk c = read(block, chunk);
    FFNSKIP_BLOCK_UNROLL
    for (int run = 0; run < 2; ++run) {
      FFNSKIP_BLOCK_UNROLL
      for (int i = 0; i < 4; ++i) w[run][i] = c.d * signed_byte_of(c.q[run], i);
    }
  }
  __host__ __device__ static float dot(const Chunk& c, int chunk, const QuantizedBlock& x) {
    uint32_t x_lo[1], x_hi[1];
    load_activation_words<4>(x.q + run_start(chunk, 0), x_lo);
    load_activation_words<4>(x.q + run_start(chunk, 1), x_hi);
    return c.d * static_cast<float>(dot4(c.q[0], x_lo[0], dot4(c.q[1], x_hi[0], 0)));
  }
};

// Q4_K: 256 elements, 8 sub-blocks of 32 with 6-bit scales and minimums; w = d * sc * q -
// dmin * m. Each 64 elements 64p .. 64p + 63 are the low then the high nibbles of qs[32p ..
// 32p + 31] (sub-blocks 2p and 2p + 1). Chunk c = 2p + k: the bytes qs[32p + 16k .. + 15], runs
// of elements 64p + 16k .. + 15 (low nibbles) and 64p + 32 + 16k .. + 15 (high nibbles).
template <>
struct BlockFormat<TensorType::Q4_K> {
  static constexpr TensorType kType = TensorType::Q4_K;
  static constexpr int kElements = 256, kBytes = sizeof(BlockQ4_K), kAlignment = 16;
  static constexpr int kChunks = 8, kRuns = 2, kRunLength = 16;
  static constexpr bool kActivationSums16 = true;  // its minimums
  __host__ __device__ static int run_start(int chunk, int run) {
    return 64 * (chunk / 2) + 32 * run + 16 * (chunk % 2);
  }
  // k_scale_min() of csrc/core/tensor_types.h, from the 12 scale bytes at `scales`.
  __host__ __device__ static void scale_min(const uint8_t* scales, int j, uint32_t& scale,
                                            uint32_t& min) {
    if (j < 4) {
      scale = load_u8(scales + j) & 63u;
      min = load_u8(scales + j + 4) & 63u;
    } else {
      const uint32_t packed = load_u8(scales + j + 4);
      scale = (packed & 0xfu) | ((load_u8(scales + j - 4) >> 6) << 4);
      min = (packed >> 4) | ((load_u8(scales + j) >> 6) << 4);
    }
  }
  // The chunk's 16 quant bytes, the scales and minimums of its two sub-blocks.
  struct Chunk {
    uint32_t words[4];
    uint32_t scale[2], min[2];
    float d, dmin;
  };
  __host__ __device__ static Chunk read(const uint8_t* block, int chunk) {
    Chunk c;
    c.d = load_fp16(block);
    c.dmin = load_fp16(block + 2);
    const int pair = chunk / 2;
    FFNSKIP_BLOCK_UNROLL
    for (int run = 0; run < 2; ++run) {
      scale_min(block + 4, 2 * pair + run, c.scale[run], c.min[run]);
    }
    load_u32x4(block + 16 + 32 * pair + 16 * (chunk % 2), c.words);  // 16-byte aligned
    return c;
  }
  __host__ __device__ static void decode(const uint8_t* block, int chunk,
                                         float (&w)[kRuns][kRunLength]) {
    const Chunk c = read(block, chunk);
    float factor[2], offset[2];
    FFNSKIP_BLOCK_UNROLL
    for (int run = 0; run < 2; ++run) {
      factor[run] = c.d * static_cast<float>(c.scale[run]);
      offset[run] = c.dmin * static_cast<float>(c.min[run]);
    }
    FFNSKIP_BLOCK_UNROLL
    for (int word = 0; word < 4; ++word) {
      FFNSKIP_BLOCK_UNROLL
      for (int i = 0; i < 4; ++i) {
        const uint32_t byte = byte_of(c.words[word], i);
        w[0][4 * word + i] = factor[0] * int_minus(byte & 0xfu, 0.0f) - offset[0];
        w[1][4 * word + i] = factor[1] * int_minus(byte >> 4, 0.0f) - offset[1];
      }
    }
  }
  // d * sum_runs sc * (q . x) - dmin * sum_runs m * (sum of x over the run): the runs' sums of
  // 16 activations are sums16 of the block.
  __host__ __device__ static float dot(const Chunk& c, int chunk, const QuantizedBlock& x) {
    int scaled = 0, minimums = 0;
    FFNSKIP_BLOCK_UNROLL
    for (int run = 0; run < 2; ++run) {
      const int start = run_start(chunk, run);
      uint32_t xw[4];
      load_activation_words<16>(x.q + start, xw);
      int sum = 0;
      FFNSKIP_BLOCK_UNROLL
      for (int i = 0; i < 4; ++i) sum = dot4((c.words[i] >> (4 * run)) & 0x0f0f0f0fu, xw[i], sum);
      scaled += static_cast<int>(c.scale[run]) * sum;
      minimums += static_cast<int>(c.min[run]) * x.sums16[start / 16];
    }
    // One rounding order on the host and in every kernel (no contraction left to the compiler).
    return fmaf(c.d, static_cast<float>(scaled), -(c.dmin * static_cast<float>(minimums)));
  }
};

// Q6_K: 256 elements in two halves of 128, 16 sub-blocks of 16 with int8 scales; w = d * sc *
// (q - 32), q = 4 low bits from ql and 2 high bits from qh. In half h, byte l (0..31) of ql[64h
// ..] gives elements 128h + l (low nibble) and + 64 (high), byte l + 32 gives + 32 and + 96, and
// qh[32h + l] their high bits in pairs; element 128h + 32r + l has scale 8h + 2r + l / 16.
// Chunk c = 8h + k: l = 4k .. 4k + 3, runs 128h + 32r + 4k .. + 3 for r = 0..3.
template <>
struct BlockFormat<TensorType::Q6_K> {
  static constexpr TensorType kType = TensorType::Q6_K;
  static constexpr int kElements = 256, kBytes = sizeof(BlockQ6_K), kAlignment = 2;
  static constexpr int kChunks = 16, kRuns = 4, kRunLength = 4;
  static constexpr bool kActivationSums16 = false;
  __host__ __device__ static int run_start(int chunk, int run) {
    return 128 * (chunk / 8) + 32 * run + 4 * (chunk % 8);
  }
  // The quants of a run as the signed bytes q - 32; dot() is d * sum_runs sc * ((q - 32) . x).
  struct Chunk {
    uint32_t q[4];  // per run, int8
    int scale[4];
    float d;
  };
  __host__ __device__ static Chunk read(const uint8_t* block, int chunk) {
    const int half = chunk / 8, l = 4 * (chunk % 8);
    const uint8_t* ql = block + offsetof(BlockQ6_K, ql) + 64 * half + l;
    const uint32_t low[2] = {load_u32<kAlignment>(ql), load_u32<kAlignment>(ql + 32)};
    const uint32_t high = load_u32<kAlignment>(block + offsetof(BlockQ6_K, qh) + 32 * half + l);
    const uint8_t* scales = block + offsetof(BlockQ6_K, scales) + 8 * half + l / 16;
    Chunk c;
    FFNSKIP_BLOCK_UNROLL
    for (int run = 0; run < 4; ++run) {
      const uint32_t nibbles = (run < 2 ? low[run % 2] : low[run % 2] >> 4) & 0x0f0f0f0fu;
      c.q[run] = sub_bytes(nibbles | (((high >> (2 * run)) & 0x03030303u) << 4), 0x20202020u);
      c.scale[run] = static_cast<int8_t>(load_u8(scales + 2 * run));
    }
    c.d = load_fp16(block + offsetof(BlockQ6_K, d));
    return c;
  }
  __host__ __device__ static void decode(const uint8_t* block, int chunk,
                                         float (&w)[kRuns][kRunLength]) {
    const Chunk c = read(block, chunk);
    FFNSKIP_BLOCK_UNROLL
    for (int run = 0; run < 4; ++run) {
      const float factor = c.d * static_cast<float>(c.scale[run]);
      FFNSKIP_BLOCK_UNROLL
      for (int i = 0; i < 4; ++i) w[run][i] = factor * signed_byte_of(c.q[run], i);
    }
  }
  __host__ __device__ static float dot(const Chunk& c, int chunk, const QuantizedBlock& x) {
    int scaled = 0;
    FFNSKIP_BLOCK_UNROLL
    for (int run = 0; run < 4; ++run) {
      uint32_t xw[1];
      load_activation_words<4>(x.q + run_start(chunk, run), xw);
      scaled += c.scale[run] * dot4(c.q[run], xw[0], 0);
    }
    return c.d * static_cast<float>(scaled);
  }
};

// ---- dispatch ----

// The formats the kernels read in place.
constexpr bool is_native_block_format(TensorType type) {
  return type == TensorType::Q8_0 || type == TensorType::Q5_0 || type == TensorType::Q4_K ||
         type == TensorType::Q6_K;
}

// Calls visit(BlockFormat<type>{}) for a native format `type`.
template <typename Visitor>
void visit_block_format(TensorType type, Visitor&& visit) {
  switch (type) {
    case TensorType::Q8_0: return visit(BlockFormat<TensorType::Q8_0>{});
    case TensorType::Q5_0: return visit(BlockFormat<TensorType::Q5_0>{});
    case TensorType::Q4_K: return visit(BlockFormat<TensorType::Q4_K>{});
    case TensorType::Q6_K: return visit(BlockFormat<TensorType::Q6_K>{});
    default:
      throw std::logic_error("the CUDA kernels do not read tensor type " +
                             std::to_string(static_cast<int>(type)) + " in place");
  }
}

// Bytes of a row of `cols` elements (a whole number of blocks) of a native format.
template <typename Format>
__host__ __device__ constexpr int64_t format_row_bytes(int64_t cols) {
  return cols / Format::kElements * Format::kBytes;
}

// Thread `t` of `threads` decodes its chunks (t, t + threads, ...) of the row at `src` of `cols`
// elements into dst: the dequantisation kernel's rows and the embedding lookup's.
template <typename Format, typename Out>
__device__ __forceinline__ void dequantize_row(const uint8_t* __restrict__ src, int cols,
                                               Out* __restrict__ dst, int t, int threads) {
  const int chunks = cols / Format::kElements * Format::kChunks;
  for (int c = t; c < chunks; c += threads) {
    const int block = c / Format::kChunks;
    const int chunk = c % Format::kChunks;
    float w[Format::kRuns][Format::kRunLength];
    Format::decode(src + block * Format::kBytes, chunk, w);
#pragma unroll
    for (int run = 0; run < Format::kRuns; ++run) {
      Out* run_dst = dst + block * Format::kElements + Format::run_start(chunk, run);
#pragma unroll
      for (int e = 0; e < Format::kRunLength; ++e) run_dst[e] = from_float<Out>(w[run][e]);
    }
  }
}

}  // namespace ffnskip::cuda
