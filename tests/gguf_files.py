"""Writing GGUF files for tests the way llama.cpp's converter lays them out, with weights
quantised by gguf-py's quants module (or, for the K-quants it cannot quantise, random blocks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from ffnskip_ext.config import ModelConfig
from ffnskip_ext.loaders import expected_shapes

Q = gguf.GGMLQuantizationType
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants can quantise these
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]  # dequantise only: random blocks are made by hand


def gguf_name(hf_name: str) -> str:
    """HF tensor name -> llama.cpp name (written independently of the loader's table)."""
    for hf, gg in (
        ("model.embed_tokens", "token_embd"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
        ("model.layers.", "blk."),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ):
        hf_name = hf_name.replace(hf, gg)
    return hf_name


def llamacpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute; rows may be quantised blocks."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


Encoded = dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]


def encode(weights: dict[str, np.ndarray], qtype: gguf.GGMLQuantizationType) -> Encoded:
    """Quantise matrices to qtype; vectors stay F32 as llama.cpp keeps them."""
    return {
        name: (gguf.quants.quantize(w, qtype), qtype) if w.ndim == 2 else (w, Q.F32)
        for name, w in weights.items()
    }


def decode(tensors: Encoded) -> dict[str, np.ndarray]:
    return {name: gguf.quants.dequantize(d, t) for name, (d, t) in tensors.items()}


def write_gguf(
    path: Path,
    config: ModelConfig,
    tensors: Encoded,
    *,
    vocab_as_token_list: bool = False,
    raw_tensors: dict[str, np.ndarray] | None = None,
    edit: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a GGUF the way llama.cpp's converter lays it out (HF-order data in ``tensors``)."""
    w = gguf.GGUFWriter(str(path), config.architecture)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    if config.head_dim != config.hidden_size // config.num_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if vocab_as_token_list:
        w.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    else:
        w.add_vocab_size(config.vocab_size)
    for eos in config.eos_token_ids:
        w.add_eos_token_id(eos)
    if edit is not None:
        edit(w)
    for name, (data, qtype) in tensors.items():
        if config.architecture == "llama" and ".self_attn.q_proj." in name:
            data = llamacpp_permute(data, config.num_heads)
        elif config.architecture == "llama" and ".self_attn.k_proj." in name:
            data = llamacpp_permute(data, config.num_kv_heads)
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    for name, data in (raw_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path



def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(config).items()
    }


def random_k_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant rows: random integers and sub-block scales, small finite fp16 scales."""
    elements, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    blocks = rng.integers(0, 256, size=(rows, cols // elements, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, size=(rows, cols // elements, 2)).astype(np.float16)
    at, width = k_scale_bytes(type_name, size)
    blocks[..., at:at + width] = scales.view(np.uint8).reshape(rows, -1, 4)[..., :width]
    return blocks.reshape(rows, -1)


def k_scale_bytes(type_name: str, block_size: int) -> tuple[int, int]:
    """(offset, width) of the fp16 super-block scales: Q6_K keeps d last, Q4_K/Q5_K lead with
    d and dmin."""
    return (block_size - 2, 2) if type_name == "Q6_K" else (0, 4)


def quantized(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, blocks bytes] of type_name holding random weights."""
    if type_name in K_QUANTS:
        return random_k_blocks(type_name, rows, cols, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(w, Q[type_name])


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """[rows, block bytes] of `w` in type_name: gguf-py's quantiser, or for the K-quants a
    plain one (one scale and minimum per sub-block, nearest levels; llama.cpp searches for
    better scales, which changes the error, not the format)."""
    if type_name not in K_QUANTS:
        return gguf.quants.quantize(w.astype(np.float32), Q[type_name])
    rows, cols = w.shape
    sub = w.astype(np.float64).reshape(rows, cols // 256, -1, 16 if type_name == "Q6_K" else 32)
    if type_name == "Q6_K":
        return _q6_k(sub).reshape(rows, -1)
    return _q45_k(sub, 15 if type_name == "Q4_K" else 31).reshape(rows, -1)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _q45_k(sub: np.ndarray, top: int) -> np.ndarray:
    """Q4_K (top 15) / Q5_K (top 31): w = d * sc * q - dmin * m, 6-bit sc and m per 32."""
    low = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - low) / top  # [rows, blocks, 8]
    d = _f16(scale.max(axis=-1) / 63)
    dmin = _f16(-low.min(axis=-1) / 63)
    d64, dmin64 = d.astype(np.float64)[..., None], dmin.astype(np.float64)[..., None]
    sc = np.clip(np.round(np.divide(scale, d64, out=np.zeros_like(scale), where=d64 > 0)), 0, 63)
    m = np.clip(np.round(np.divide(-low, dmin64, out=np.zeros_like(low), where=dmin64 > 0)), 0, 63)
    step = (d64 * sc)[..., None]
    q = np.clip(np.round(np.divide(sub + (dmin64 * m)[..., None], step,
                                   out=np.zeros_like(sub), where=step > 0)), 0, top)
    sc, m, q = sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)
    # get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7
    # (mins); 4-7 split into nibbles in bytes 8-11 and the top 2 bits of bytes 0-7.
    packed = np.zeros((*sc.shape[:-1], 12), np.uint8)
    packed[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    # 64 elements per 32 bytes: the low nibbles hold sub-block 2c, the high ones 2c + 1.
    pairs = q.reshape(*q.shape[:-2], 4, 2, 32)
    qs = ((pairs[..., 0, :] & 15) | ((pairs[..., 1, :] & 15) << 4)).reshape(*q.shape[:-2], 128)
    parts = [d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), packed]
    if top == 31:  # the fifth bit: bit 2c of qh[l] for sub-block 2c, bit 2c + 1 for 2c + 1
        high = (q >> 4).reshape(*q.shape[:-2], 8, 32)
        qh = np.zeros((*q.shape[:-2], 32), np.uint8)
        for j in range(8):
            qh |= high[..., j, :] << j
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=-1)


def _q6_k(sub: np.ndarray) -> np.ndarray:
    """Q6_K: w = d * sc * (q - 32), an int8 sc per 16, 6-bit q split into ql (4) and qh (2)."""
    amax = np.abs(sub).max(axis=-1)  # [rows, blocks, 16]
    scale = amax / 31
    d = _f16(scale.max(axis=-1) / 127)
    d64 = d.astype(np.float64)[..., None]
    sc = np.clip(np.round(np.divide(scale, d64, out=np.zeros_like(scale), where=d64 > 0)),
                 -128, 127)
    step = (d64 * sc)[..., None]
    q = (np.clip(np.round(np.divide(sub, step, out=np.zeros_like(sub), where=step > 0)),
                 -32, 31) + 32).astype(np.uint8).reshape(*sub.shape[:-2], 2, 4, 32)
    # Per half of 128: ql[l] = q[l] | q[l + 64] << 4, ql[l + 32] = q[l + 32] | q[l + 96] << 4,
    # qh[l] = the top 2 bits of q[l], q[l + 32], q[l + 64], q[l + 96] at bits 0, 2, 4, 6.
    ql = np.concatenate([(q[..., 0, :] & 15) | ((q[..., 2, :] & 15) << 4),
                         (q[..., 1, :] & 15) | ((q[..., 3, :] & 15) << 4)], axis=-1)
    qh = sum((q[..., k, :] >> 4) << (2 * k) for k in range(4)).astype(np.uint8)
    return np.concatenate([ql.reshape(*sub.shape[:-2], 128), qh.reshape(*sub.shape[:-2], 64),
                           sc.astype(np.int8).view(np.uint8), d[..., None].view(np.uint8)],
                          axis=-1)


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, block bytes] of random bytes (every bit pattern of the quants and sub-block
    scales) with small finite fp16 scales, for any block type."""
    if type_name in K_QUANTS:
        return random_k_blocks(type_name, rows, cols, rng)
    elements, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    blocks = rng.integers(0, 256, size=(rows, cols // elements, size), dtype=np.uint8)
    scale_bytes = 4 if type_name in ("Q4_1", "Q5_1") else 2  # d (and m) lead every block
    scales = rng.uniform(0.001, 0.02, size=(rows, cols // elements, scale_bytes // 2))
    blocks[..., :scale_bytes] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)
