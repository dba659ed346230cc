"""GGUF files (llama.cpp's format): model config, weights and tokenizer metadata from one parse.

``open_gguf`` parses a file once and caches the result for its path and modification time,
so that the weights (``load_gguf``) and the tokenizer (``runtime.tokenizer``) read the same
parse. The ``gguf`` package is imported only when a GGUF file is read.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any

import numpy as np

from ..config import ModelConfig
from .tensors import Weights, check_shape, expected_shapes

# The tensor types the loader dequantises (names of gguf.GGMLQuantizationType).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFFile:
    """One parsed GGUF file: metadata fields and tensor infos (data stays memory-mapped)."""

    def __init__(self, path: str) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the gguf parser fails on corrupt files in many ways
            raise ValueError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.get_field(key)
        return default if f is None else f.contents()


def open_gguf(path: str) -> GGUFFile:
    """The parse of ``path``, shared while the file is unchanged."""
    st = os.stat(path)
    return _parse(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse(path: str, inode: int, size: int, mtime_ns: int) -> GGUFFile:
    del inode, size, mtime_ns  # the cache key: a rewritten file is parsed again
    return GGUFFile(path)


def load_gguf(path: str) -> tuple[ModelConfig, Weights]:
    try:
        return _read_gguf(path)
    except Exception as e:  # the gguf parser fails on corrupt files in many ways
        if type(e) is ValueError and path in str(e):
            raise  # ours: already names the file and the problem
        raise ValueError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from e


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    m = _HF_LAYER_RE.fullmatch(stem)
    if m:
        return f"blk.{m[1]}.{_LAYER_NAMES[m[2]]}.{kind}"
    return f"{_GLOBAL_NAMES[stem]}.{kind}"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (the inverse of convert_hf_to_gguf's ``permute``).

    llama.cpp's rope rotates adjacent pairs (x0, x1) where HF rotates the two halves of each
    head (x0, x_{d/2}), so the converter interleaves the halves of every head's rows. Same
    as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: str) -> tuple[ModelConfig, Weights]:
    import gguf

    parsed = open_gguf(path)
    config = _gguf_config(parsed)
    weights: Weights = {}
    for name, shape in expected_shapes(config).items():
        stored_name = gguf_name(name)
        tensor = parsed.tensors.get(stored_name)
        if tensor is None:
            raise ValueError(f"{path}: missing tensor {stored_name!r} (for {name!r})")
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(
                f"{path}: tensor {stored_name!r} has unsupported type {tensor.tensor_type.name} "
                f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
            )
        # GGUF lists dims as ggml ne (fastest-varying first): the reverse of numpy/HF order.
        found = tuple(int(d) for d in reversed(tensor.shape))
        check_shape(path, f"{stored_name} ({name})", found, shape)
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if config.architecture == "llama":
            if ".self_attn.q_proj." in name:
                w = _unpermute_rows(w, config.num_heads)
            elif ".self_attn.k_proj." in name:
                w = _unpermute_rows(w, config.num_kv_heads)
        weights[name] = np.array(w, dtype=np.float32, order="C")
    return config, weights


def _gguf_config(parsed: GGUFFile) -> ModelConfig:
    import gguf

    path, field, tensors = parsed.path, parsed.field, parsed.tensors
    arch = field("general.architecture")
    if arch is None:
        raise ValueError(f"{path}: missing GGUF metadata 'general.architecture'")

    def need(suffix: str) -> Any:
        value = field(f"{arch}.{suffix}")
        if value is None:
            raise ValueError(f"{path}: missing GGUF metadata '{arch}.{suffix}'")
        return value

    hf: dict[str, Any] = {"model_type": arch}
    if arch not in ("llama", "qwen2"):
        # Let ModelConfig produce the unsupported-architecture error.
        return ModelConfig.from_hf_dict(hf, source=path)
    hf.update(
        num_hidden_layers=need("block_count"),
        hidden_size=need("embedding_length"),
        intermediate_size=need("feed_forward_length"),
        num_attention_heads=need("attention.head_count"),
        num_key_value_heads=field(f"{arch}.attention.head_count_kv"),
        head_dim=field(f"{arch}.attention.key_length"),
        rms_norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
    )
    context = field(f"{arch}.context_length")
    if context is not None:
        hf["max_position_embeddings"] = context
    hf["vocab_size"] = field(f"{arch}.vocab_size") or _gguf_vocab_size(parsed)

    scaling = field(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: rope scaling type {scaling!r} is not supported")
    if "rope_freqs.weight" in tensors:
        # llama.cpp stores LLaMA 3.1 rope scaling only as this per-frequency factor table.
        head_dim = hf["head_dim"] or hf["hidden_size"] // hf["num_attention_heads"]
        freqs = tensors["rope_freqs.weight"]
        hf["rope_scaling"] = _llama3_rope_from_factors(
            path,
            gguf.quants.dequantize(freqs.data, freqs.tensor_type),
            head_dim,
            float(hf["rope_theta"]),
            int(field(f"{arch}.rope.scaling.original_context_length", 8192)),
        )
    return ModelConfig.from_hf_dict(hf, source=path)


def _gguf_vocab_size(parsed: GGUFFile) -> int:
    tokens = parsed.reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    if "token_embd.weight" in parsed.tensors:
        return int(parsed.tensors["token_embd.weight"].shape[-1])
    raise ValueError(f"{parsed.path}: cannot determine the vocabulary size")


def _llama3_rope_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position: int,
) -> np.ndarray:
    """Per-frequency divisors of LLaMA 3.1 rope scaling, as llama.cpp's converter tabulates."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    # x = original_ctx / wavelength; smooth is the linear ramp between the two cut-offs.
    x = original_max_position * inv_freq / (2 * math.pi)
    smooth = np.clip((x - low_freq_factor) / (high_freq_factor - low_freq_factor), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def _llama3_rope_from_factors(
    path: str, table: np.ndarray, head_dim: int, theta: float, original_max_position: int
) -> dict[str, Any]:
    """Recover llama3 rope parameters that reproduce llama.cpp's ``rope_freqs`` table.

    The table is 1/((1-s)/factor + s) with s = clip(a*x + b, 0, 1), x = L/wavelength, so
    ``factor`` is its maximum and (a, b) follow from the ramp entries; any (low, high)
    giving the same line reproduces it, so L is taken from the metadata (default 8192).
    """
    table = np.asarray(table, dtype=np.float64).reshape(-1)
    unsupported = ValueError(f"{path}: rope_freqs.weight is not a llama3 rope scaling table")
    if table.shape != (head_dim // 2,) or not np.all(np.isfinite(table)) or table.min() < 1:
        raise unsupported
    factor = float(table.max())
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    x = original_max_position / theta ** (np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    s = (1.0 / table - 1.0 / factor) / (1.0 - 1.0 / factor)
    ramp = (s > 1e-6) & (s < 1 - 1e-6)
    if ramp.sum() >= 2:
        a, b = np.polyfit(x[ramp], s[ramp], 1)
    else:
        # Too few ramp entries to fit (small head_dim): take the gentlest line through the
        # ramp entry (or the last fully scaled one) that still keeps every unscaled entry at
        # s >= 1 and every fully scaled one at s <= 0; x decreases along the table.
        x_full = x[s <= 1e-6].max()
        x_m, s_m = (x[ramp][0], s[ramp][0]) if ramp.any() else (x_full, 0.0)
        bounds = []
        if (s >= 1 - 1e-6).any():
            bounds.append((1 - s_m) / (x[s >= 1 - 1e-6].min() - x_m))
        if ramp.any():
            bounds.append(s_m / (x_m - x_full))
        a = max(bounds, default=1.0 / x_m)
        b = s_m - a * x_m
    if a <= 0:
        raise unsupported
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": float(-b / a),
        "high_freq_factor": float((1 - b) / a),
        "original_max_position_embeddings": original_max_position,
    }
    rebuilt = _llama3_rope_factors(
        head_dim, theta, factor, params["low_freq_factor"], params["high_freq_factor"],
        original_max_position,
    )
    if not np.allclose(rebuilt, table, rtol=1e-4, atol=0):
        raise unsupported
    return params
