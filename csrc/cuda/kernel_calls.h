// Single CUDA kernels run on host buffers, for the per-kernel tests (tests/test_cuda_kernels.py):
// the requests the core's loader hands to libffnskip_cuda.so (entry_points.h). Plain C++, so the
// core and the Python module compile them without the CUDA toolkit.
#pragma once

#include <cstdint>
#include <variant>

#include "ffnskip/decoder.h"
#include "ffnskip/weights.h"

namespace ffnskip {

enum class CudaLinearOutput : uint8_t { Store, Accumulate, SwiGLU };  // GemvOutput's modes

// y = x W^T + b over n tokens, as the backend runs a linear: the decode GEMV (gemv, n == 1) or
// the prefill path (cuBLAS, over tiles dequantised to T for a block format).
struct CudaLinearCall {
  // [rows, cols]: the blocks of a native block format (Q8_0, Q5_0, Q4_K, Q6_K), or F32 values
  // that the call rounds to the activation type (the dense kernels).
  const void* weight = nullptr;
  TensorType weight_type = TensorType::F32;
  int rows = 0;
  int cols = 0;
  const float* bias = nullptr;  // [rows] or null
  const float* x = nullptr;     // [n, cols], rounded to the activation type
  int n = 1;
  // GEMV: non-null makes x the fp32 residual row that the kernel's RMSNorm prologue normalises
  // with this weight [cols] (not rounded first), as the decode step's QKV and gate/up GEMVs do.
  const float* norm_weight = nullptr;
  float norm_eps = 0.0f;
  DType activation = DType::F16;  // F32, F16 or BF16: the backend's storage type T
  CudaLinearOutput output = CudaLinearOutput::Store;
  bool gemv = true;
  bool skip = false;  // GEMV: its skip flag is set, so it must write nothing
  // Prefill of a block format: the most weights a dequantised tile holds (several tiles when
  // fewer than rows * cols); 0: rows * cols. Up to kBlockGemvMaxTokens tokens run the block
  // GEMV instead.
  int64_t tile_elements = 0;
  // In: the output before the call; out: after it. Store, Accumulate: [n, rows]; SwiGLU:
  // [n, rows / 2], rounded to the activation type on the way in, widened on the way out.
  float* y = nullptr;
};

// Every row of a native block format dequantised on the device into `out_type` (F32, F16 or
// BF16), as the prefill's weight tiles.
struct CudaDequantizeCall {
  const void* data = nullptr;  // [rows, cols] in `type`
  TensorType type = TensorType::Q8_0;
  int rows = 0;
  int cols = 0;
  DType out_type = DType::F32;
  float* out = nullptr;  // [rows, cols], widened to fp32
};

// The kernels of a layer and of the head, one call each. Host buffers throughout: inputs the
// kernel reads in the activation type (F32, F16 or BF16: the backend's storage type T) are
// rounded to it on the way in, outputs it writes in T are widened to fp32 on the way out.
// `skip` sets the kernel's skip flag (the kernels of a skipped FFN or routed-off layer), which
// must leave every output as it was.

// RMSNorm of n fp32 rows into T (norm.cuh).
struct CudaRmsNormCall {
  const float* x = nullptr;  // [n, dim]
  int n = 0;
  int dim = 0;
  const float* weight = nullptr;  // [dim]
  float eps = 0.0f;
  DType activation = DType::F16;
  float* out = nullptr;  // [n, dim]
};

// RoPE of the q heads (in place, fp32) and the K/V write of n tokens at positions pos.. into a
// cache in T (rope.cuh); or, given a weight, the decode step's fused form: one token's
// [q; k; v] projection (rows from q_dim on without rotate_q) with RoPE and the K/V write in the
// GEMV's epilogue (gemv.cuh RopeKv), writing only the q part of qkv.
struct CudaRopeCall {
  float* qkv = nullptr;  // in/out [n, (num_heads + 2 kv_heads) * head_dim]: q, k, v
  int n = 0;
  int pos = 0;
  int num_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  bool rotate_q = true;  // false: writes K/V only (q_heads = 0, a layer reduced to K/V)
  const float* inv_freq = nullptr;  // [head_dim / 2]
  bool interleaved = false;
  bool skip = false;
  DType activation = DType::F16;
  int cache_rows = 0;  // at least pos + n
  float* k_cache = nullptr;  // in/out [cache_rows, kv_heads * head_dim]
  float* v_cache = nullptr;
  // The fused form (n = 1): weight [rows, cols] as in CudaLinearCall, x [cols] rounded to T.
  const void* weight = nullptr;
  TensorType weight_type = TensorType::F32;
  int cols = 0;
  const float* bias = nullptr;  // [rows] or null
  const float* x = nullptr;
  int split_row = 0;  // > 0: two GEMVs, rows below and from it (a head boundary), as segments
};

// act = silu(gate) * up of the stacked [gate | up] fp32 rows, into T (swiglu.cuh).
struct CudaSwigluCall {
  const float* gate_up = nullptr;  // [n, 2 inter]
  int n = 0;
  int inter = 0;
  bool skip = false;
  DType activation = DType::F16;
  float* act = nullptr;  // in/out [n, inter]
};

// Attention of one decode token at position pos over cache rows 0..pos, split along the cache
// in num_splits parts (decode_attention.cuh).
struct CudaDecodeAttentionCall {
  const float* q = nullptr;  // [num_heads * head_dim], rotated, fp32
  int num_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int pos = 0;
  int num_splits = 1;
  int cache_rows = 0;  // at least pos + 1
  const float* k_cache = nullptr;  // [cache_rows, kv_heads * head_dim]
  const float* v_cache = nullptr;
  bool skip = false;
  DType activation = DType::F16;
  float* out = nullptr;  // in/out [num_heads * head_dim]
};

// Causal attention of the n tokens of a prefill at positions pos.. (prefill_attention.cuh).
struct CudaPrefillAttentionCall {
  const float* q = nullptr;  // [n, num_heads * head_dim], rotated, fp32
  int n = 0;
  int pos = 0;
  int num_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int cache_rows = 0;  // at least pos + n
  const float* k_cache = nullptr;  // [cache_rows, kv_heads * head_dim]
  const float* v_cache = nullptr;
  DType activation = DType::F16;
  float* out = nullptr;  // [n, num_heads * head_dim]
};

// FiRST's router of one layer over the first n tokens' input rows (router.cuh).
struct CudaRouteCall {
  const float* x = nullptr;  // [n, hidden] fp32: the layer's input
  int n = 0;
  int hidden = 0;
  const float* norm_weight = nullptr;  // [hidden]: the layer's input RMSNorm
  float eps = 0.0f;
  const float* weight = nullptr;  // [hidden]: the router
  float bias = 0.0f;
  float threshold_logit = 0.0f;
  int32_t* layer_off = nullptr;  // out: 1 when the layer is routed off
  float* gate = nullptr;         // out: sigmoid of the router's logit
};

// The skip scores (score.cuh): with ffn_out, the FFN's residual add x += ffn_out fused with
// the saturation score cos(x before, x after), recorded as the skip state does (clamped);
// without, the layer score cos(x, b).
struct CudaScoreCall {
  float* x = nullptr;  // [hidden]; written (x + ffn_out) in the residual-add mode
  const float* ffn_out = nullptr;  // [hidden], or null: cos(x, b)
  const float* b = nullptr;        // [hidden] when ffn_out is null
  int hidden = 0;
  bool skip = false;
  float* score = nullptr;  // in/out: the score (NaN for a skipped cosine, unchanged otherwise)
};

// The head: the final RMSNorm of one fp32 row into T, then the vocabulary GEMV (logits.cuh).
struct CudaLogitsCall {
  const float* x = nullptr;  // [hidden]
  int hidden = 0;
  const float* final_norm = nullptr;  // [hidden]
  float eps = 0.0f;
  // [vocab, hidden]: F32 values rounded to the activation type, or a native block format.
  const void* lm_head = nullptr;
  TensorType lm_head_type = TensorType::F32;
  int vocab = 0;
  DType activation = DType::F16;
  float* logits = nullptr;  // [vocab]
};

// The embedding lookup of n tokens into the fp32 residual stream (embedding.cuh); with a rule,
// as a decode step's first kernel: it also starts the rule's token at decode_index (the skip
// state's begin_token, skip_rule.h).
struct CudaEmbeddingCall {
  // [rows, cols]: F32 values rounded to the activation type, or a native block format.
  const void* table = nullptr;
  TensorType type = TensorType::F32;
  int rows = 0;
  int cols = 0;
  const int32_t* ids = nullptr;  // [n]
  int n = 0;
  const SkipRule* rule = nullptr;
  int32_t decode_index = 0;
  DType activation = DType::F16;
  float* out = nullptr;  // [n, cols]
  // Out, with a rule: the state the token starts from (dense_token, budget, in_run as floats,
  // then prev_score), from a state of other values.
  float* started = nullptr;  // [4]
};

using CudaKernelCall =
    std::variant<CudaRmsNormCall, CudaRopeCall, CudaSwigluCall, CudaDecodeAttentionCall,
                 CudaPrefillAttentionCall, CudaRouteCall, CudaScoreCall, CudaLogitsCall,
                 CudaEmbeddingCall>;

}  // namespace ffnskip
