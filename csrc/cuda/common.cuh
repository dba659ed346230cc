// Device helpers shared by the kernel families: the storage types (float, __half,
// __nv_bfloat16) and their conversion to fp32, 16-byte loads, warp and block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ffnskip/weights.h"

namespace ffnskip::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Every storage type of the weights: X(T) once per type, for explicit instantiations.
#define FFNSKIP_FOR_EACH_STORAGE_TYPE(X) X(float) X(__half) X(__nv_bfloat16)

// The TensorType of a storage type: the type of the dense (unquantised) weights a backend in T
// holds.
template <typename T>
constexpr TensorType dense_tensor_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> ||
                std::is_same_v<T, __nv_bfloat16>);
  return std::is_same_v<T, float>    ? TensorType::F32
         : std::is_same_v<T, __half> ? TensorType::F16
                                     : TensorType::BF16;
}

// fp32 value of a stored element.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds to the storage type (round to nearest even); also used on the host to upload weights.
template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// A 16-byte pack of stored elements, widened to fp32. Elements are little-endian in the
// 32-bit words of a uint4: the element at the lower address is in the low bits.
template <typename T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int kCount = 4;
  __device__ __forceinline__ static void widen(const uint4& raw, float (&out)[kCount]) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
};

template <>
struct Pack<__half> {
  static constexpr int kCount = 8;
  __device__ __forceinline__ static void widen(const uint4& raw, float (&out)[kCount]) {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] & 0xffffu)));
      out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] >> 16)));
    }
  }
};

template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kCount = 8;
  // A bfloat16 is the upper half of the fp32 with the same bits.
  __device__ __forceinline__ static void widen(const uint4& raw, float (&out)[kCount]) {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

// The 16 bytes at `p` (16-byte aligned, not written during the kernel).
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The same from global or shared memory (a GEMV's input, which its RMSNorm prologue stages in
// shared memory): a plain load, where __ldg needs a global address.
template <typename T>
__device__ __forceinline__ uint4 load_raw_anywhere(const T* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// The 16-byte pack at `p`, widened to fp32.
template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[Pack<T>::kCount]) {
  Pack<T>::widen(load_raw(p), out);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Sum over the block (blockDim.x a multiple of 32), returned to every thread; a fixed
// reduction tree, so the result is the same on every run. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(lane < warps ? scratch[lane] : 0.0f);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const float total = scratch[0];
  __syncthreads();  // scratch may be reused by the next call
  return total;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

}  // namespace ffnskip::cuda
