"""Load LLaMA-family weights as float32 numpy arrays under Hugging Face tensor names.

Sources: a Hugging Face model directory (``config.json`` + safetensors, parsed here so
the runtime needs no torch), a ``.gguf`` file (dequantised with the ``gguf`` package), or
an in-memory transformers model. Every loader checks each tensor's shape against the
:class:`ModelConfig` so that a bad checkpoint fails here, with names, rather than in the
engine.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from .config import ModelConfig

if TYPE_CHECKING:
    import torch

Weights = dict[str, np.ndarray]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Little-endian on disk; bf16 is read as raw uint16 and widened by hand (numpy has no bf16).
_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}

_GGUF_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
    gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q6_K,
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_GGUF_LAYER_NAMES = {
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


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[ModelConfig, Weights]:
    """Load a Hugging Face model directory or a ``.gguf`` file.

    Returns the config and ``{hf_tensor_name: float32 C-contiguous array}`` holding exactly
    the tensors the engine needs (``lm_head.weight`` only when embeddings are untied).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        return _load_hf_dir(path)
    if _is_gguf(path):
        return _load_gguf(path)
    raise ValueError(f"{path}: expected a Hugging Face model directory or a GGUF file")


def weights_from_hf_model(model: torch.nn.Module) -> tuple[ModelConfig, Weights]:
    """Extract config and weights from a transformers LlamaForCausalLM / Qwen2ForCausalLM."""
    source = type(model).__name__
    config = ModelConfig.from_hf_dict(model.config.to_dict(), source=source)
    state = model.state_dict()
    weights: Weights = {}
    for name, shape in expected_shapes(config).items():
        if name not in state:
            raise ValueError(f"{source}: missing tensor {name!r}")
        _check_shape(source, name, tuple(state[name].shape), shape)
        # Copy so the arrays do not alias the model's parameters.
        weights[name] = np.array(state[name].detach().float().cpu().numpy(), order="C")
    return config, weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape ([out, in] for linears) of every tensor the engine reads."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for proj, out in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (out, hidden)
            if config.qkv_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        mlp = (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter))
        for proj, out, inp in mlp:
            shapes[f"{p}mlp.{proj}_proj.weight"] = (out, inp)
            if config.mlp_bias:
                shapes[f"{p}mlp.{proj}_proj.bias"] = (out,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _check_shape(
    source: str, name: str, found: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    if found != expected:
        raise ValueError(
            f"{source}: tensor {name!r} has shape {list(found)}, expected {list(expected)}"
        )


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# --------------------------------------------------------------------------- safetensors


class _SafetensorsFile:
    """Header-validated view of one safetensors file; tensor data is memory-mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{path}: too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ValueError(
                    f"{path}: header length {header_len} exceeds the file size {size}"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: malformed safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: malformed safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.entries: dict[str, Any] = header
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self.entries.get(name)
        if entry is None:
            raise ValueError(f"{self.path}: missing tensor {name!r}")
        try:
            return tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: tensor {name!r} has a malformed shape entry") from e

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array (never a view into the mapped file)."""
        shape = self.shape(name)
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(
                f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r} "
                f"(supported: {', '.join(_SAFETENSORS_DTYPES)})"
            )
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{self.path}: tensor {name!r} has malformed data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            raise ValueError(
                f"{self.path}: tensor {name!r} data_offsets [{begin}, {end}] lie outside "
                f"the data section ({self.data_size} bytes)"
            )
        expected_bytes = math.prod(shape) * dtype.itemsize
        if end - begin != expected_bytes:
            raise ValueError(
                f"{self.path}: tensor {name!r} holds {end - begin} bytes, but shape "
                f"{list(shape)} of {entry['dtype']} needs {expected_bytes}"
            )
        raw = self._map[self.data_start + begin : self.data_start + end].view(dtype)
        if entry["dtype"] == "BF16":
            # bf16 is the high half of an fp32: widen and shift into place.
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32).reshape(shape)


def _load_hf_dir(directory: str) -> tuple[ModelConfig, Weights]:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: no config.json in the model directory")
    with open(config_path, encoding="utf-8") as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: invalid JSON: {e}") from e
    config = ModelConfig.from_hf_dict(hf_config, source=config_path)

    locate = _safetensors_locator(directory)
    files: dict[str, _SafetensorsFile] = {}
    weights: Weights = {}
    for name, shape in expected_shapes(config).items():
        file_path = locate(name)
        if file_path not in files:
            if not os.path.isfile(file_path):
                raise FileNotFoundError(f"{file_path}: shard listed for {name!r} does not exist")
            files[file_path] = _SafetensorsFile(file_path)
        st = files[file_path]
        # Check the header's shape before touching the data.
        _check_shape(file_path, name, st.shape(name), shape)
        weights[name] = st.read(name)
    return config, weights


def _safetensors_locator(directory: str) -> Callable[[str], str]:
    """Map a tensor name to the safetensors file that should hold it."""
    single = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.isfile(single):
        return lambda _name: single
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(
            f"{directory}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} found"
        )
    with open(index_path, encoding="utf-8") as f:
        try:
            weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: malformed safetensors index: {e}") from e

    def locate(name: str) -> str:
        if name not in weight_map:
            raise ValueError(f"{index_path}: missing tensor {name!r}")
        return os.path.join(directory, weight_map[name])

    return locate


# --------------------------------------------------------------------------- GGUF


def _gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    m = _HF_LAYER_RE.fullmatch(stem)
    if m:
        return f"blk.{m[1]}.{_GGUF_LAYER_NAMES[m[2]]}.{kind}"
    return f"{_GGUF_GLOBAL_NAMES[stem]}.{kind}"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (the inverse of convert_hf_to_gguf's ``permute``).

    llama.cpp's rope rotates adjacent pairs (x0, x1) where HF rotates the two halves of each
    head (x0, x_{d/2}), so the converter interleaves the halves of every head's rows. Same
    as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_gguf(path: str) -> tuple[ModelConfig, Weights]:
    try:
        return _read_gguf(path)
    except Exception as e:  # the gguf parser fails on corrupt files in many ways
        if type(e) is ValueError and path in str(e):
            raise  # ours: already names the file and the problem
        raise ValueError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from e


def _read_gguf(path: str) -> tuple[ModelConfig, Weights]:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _gguf_config(path, reader, tensors)
    weights: Weights = {}
    for name, shape in expected_shapes(config).items():
        gguf_name = _gguf_name(name)
        tensor = tensors.get(gguf_name)
        if tensor is None:
            raise ValueError(f"{path}: missing tensor {gguf_name!r} (for {name!r})")
        if tensor.tensor_type not in _GGUF_TYPES:
            raise ValueError(
                f"{path}: tensor {gguf_name!r} has unsupported type {tensor.tensor_type.name} "
                f"(supported: {', '.join(sorted(t.name for t in _GGUF_TYPES))})"
            )
        # GGUF lists dims as ggml ne (fastest-varying first): the reverse of numpy/HF order.
        found = tuple(int(d) for d in reversed(tensor.shape))
        _check_shape(path, f"{gguf_name} ({name})", found, shape)
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if config.architecture == "llama":
            if ".self_attn.q_proj." in name:
                w = _unpermute_rows(w, config.num_heads)
            elif ".self_attn.k_proj." in name:
                w = _unpermute_rows(w, config.num_kv_heads)
        weights[name] = np.array(w, dtype=np.float32, order="C")
    return config, weights


def _gguf_config(
    path: str, reader: gguf.GGUFReader, tensors: dict[str, gguf.ReaderTensor]
) -> ModelConfig:
    def field(key: str, default: Any = None) -> Any:
        f = reader.get_field(key)
        return default if f is None else f.contents()

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
    hf["vocab_size"] = field(f"{arch}.vocab_size") or _gguf_vocab_size(path, reader, tensors)

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


def _gguf_vocab_size(
    path: str, reader: gguf.GGUFReader, tensors: dict[str, gguf.ReaderTensor]
) -> int:
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    if "token_embd.weight" in tensors:
        return int(tensors["token_embd.weight"].shape[-1])
    raise ValueError(f"{path}: cannot determine the vocabulary size")


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
