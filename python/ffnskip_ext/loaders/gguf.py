"""GGUF files (llama.cpp's format), read by this module from a memory-mapped file: the model
config, the tensors in their stored formats (read in place by the engine), and the tokenizer
metadata, all from one parse.

``open_gguf`` parses a file once and keeps the parse for its path while the file is unchanged,
so that the weights and the tokenizer (``runtime.tokenizer``) share it. Every length, count
and offset is checked against the file before it is used: a corrupt file gives a
``ValueError`` naming the file and what is wrong.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from typing import Any

import numpy as np

from .. import _core
from ..config import ModelConfig
from .tensors import Weights, check_shape, expected_shapes

# ggml's type ids: the ones the engine reads, and the others by name for error messages.
TYPE_IDS = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
            12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
OTHER_TYPE_IDS = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                  18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                  23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                  29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
SUPPORTED_TYPES = tuple(sorted(TYPE_IDS.values()))

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

# Far beyond any real file; larger counts come from corrupt headers.
_MAX_COUNT = 1 << 24
_MAX_DIMS = 4
# Metadata value types: struct format of the scalars.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:  # /proc/self/mem and the like
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    m = _HF_LAYER_RE.fullmatch(stem)
    if m:
        return f"blk.{m[1]}.{_LAYER_NAMES[m[2]]}.{kind}"
    return f"{_GLOBAL_NAMES[stem]}.{kind}"


class _Reader:
    """Sequential reads from the mapped bytes, each checked against the end."""

    def __init__(self, data: memoryview, path: str) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} "
                             f"needs {size} bytes, the file has {len(self.data)}")
        view = self.data[self.pos:self.pos + size]
        self.pos += size
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, limit: int = _MAX_COUNT) -> int:
        n = self.scalar("<Q", what)
        if n > limit:
            raise ValueError(f"{self.path}: corrupt GGUF file: {what} is {n}")
        return n

    def string(self, what: str) -> str:
        size = self.count(f"the length of {what}", limit=len(self.data))
        try:
            return str(self.take(size, what), "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: corrupt GGUF file: {what} is not UTF-8") from e

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row: a tight loop, as vocabularies hold 10^5 of them."""
        data, pos, end, out = self.data, self.pos, len(self.data), []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(n):
                if pos + 8 > end:
                    break
                (size,) = unpack(data, pos)
                pos += 8
                if size > end - pos:
                    break
                out.append(str(data[pos:pos + size], "utf-8"))
                pos += size
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: corrupt GGUF file: item {len(out)} of {what} is not "
                             "UTF-8") from e
        if len(out) < n:
            raise ValueError(f"{self.path}: truncated GGUF file: item {len(out)} of {what} at "
                             f"byte {pos} runs past the end ({end} bytes)")
        self.pos = pos
        return out

    def value(self, kind: int, what: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY:
            raise ValueError(f"{self.path}: corrupt GGUF file: {what} has value type {kind}")
        item = self.scalar("<I", f"the item type of {what}")
        n = self.count(f"the length of {what}")
        if item in _NUMPY:
            size = np.dtype(_NUMPY[item]).itemsize
            return np.frombuffer(self.take(n * size, what), _NUMPY[item]).tolist()
        if item == _STRING:
            return self.strings(n, what)
        raise ValueError(f"{self.path}: corrupt GGUF file: {what} holds items of type {item}")


class TensorInfo:
    """One tensor of the file: its name, HF-order shape, stored type and place."""

    def __init__(self, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> None:
        self.name, self.shape, self.type_id, self.offset = name, shape, type_id, offset

    @property
    def type_name(self) -> str:
        return TYPE_IDS.get(self.type_id) or OTHER_TYPE_IDS.get(self.type_id,
                                                                f"type {self.type_id}")


class GGUFFile:
    """One parsed GGUF file: metadata fields and tensor infos; the data stays mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = _core.MappedFile(path)  # ValueError for a FIFO, a device, no access
        reader = _Reader(memoryview(self.file), path)
        if bytes(reader.take(4, "the magic")) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        version = reader.scalar("<I", "the version")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = reader.count("the tensor count")
        n_fields = reader.count("the metadata count")
        self.fields: dict[str, Any] = {}
        for i in range(n_fields):
            key = reader.string(f"metadata key {i}")
            kind = reader.scalar("<I", f"the type of {key}")
            self.fields[key] = reader.value(kind, f"metadata {key!r}")
        infos = []
        for i in range(n_tensors):
            name = reader.string(f"the name of tensor {i}")
            dims = reader.scalar("<I", f"the dimensions of {name!r}")
            if not 1 <= dims <= _MAX_DIMS:
                raise ValueError(f"{path}: corrupt GGUF file: tensor {name!r} has {dims} dims")
            ne = [reader.count(f"a dimension of {name!r}", limit=1 << 40) for _ in range(dims)]
            if min(ne) < 1:
                raise ValueError(f"{path}: corrupt GGUF file: tensor {name!r} has shape {ne}")
            type_id = reader.scalar("<I", f"the type of {name!r}")
            offset = reader.scalar("<Q", f"the offset of {name!r}")
            # ggml lists dims fastest-varying first: the reverse of numpy/HF order.
            infos.append(TensorInfo(name, tuple(int(d) for d in reversed(ne)), type_id, offset))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"{path}: corrupt GGUF file: alignment {alignment!r}")
        self.data_start = (reader.pos + alignment - 1) // alignment * alignment
        self.tensors = {t.name: t for t in infos}

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def tensor(self, name: str, hf_name: str | None = None) -> Any:
        """The tensor in its stored format, mapped (``_core.Tensor``); ValueError naming it
        when its type is not supported or it runs past the file."""
        info = self.tensors[name]
        label = f"{name!r}" + (f" (for {hf_name!r})" if hf_name else "")
        if info.type_id not in TYPE_IDS:
            raise ValueError(f"{self.path}: tensor {label} has unsupported type "
                             f"{info.type_name} (supported: {', '.join(SUPPORTED_TYPES)})")
        elements = _core.TENSOR_TYPES[info.type_name][0]
        if info.shape[-1] % elements:
            raise ValueError(f"{self.path}: tensor {label} of type {info.type_name} has rows of "
                             f"{info.shape[-1]} elements, not a whole number of {elements}-element "
                             "blocks")
        if info.offset > self.file.size:
            raise ValueError(f"{self.path}: tensor {label} ({info.type_name}) starts at offset "
                             f"{info.offset}, past the end of the file")
        try:
            return _core.Tensor(self.file, self.data_start + info.offset, info.type_name,
                                list(info.shape))
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {label} ({info.type_name}): {e}") from None


def open_gguf(path: str) -> GGUFFile:
    """The parse of ``path``, shared while the file is unchanged."""
    st = os.stat(path)
    return _parse(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse(path: str, inode: int, size: int, mtime_ns: int) -> GGUFFile:
    del inode, size, mtime_ns  # the cache key: a rewritten file is parsed again
    return GGUFFile(path)


def gguf_tensors(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and every tensor the engine reads, mapped in their stored formats. LLaMA's
    Q and K rows stay in llama.cpp's order (``config.rope_interleaved``)."""
    return _read(path, native=True)


def load_gguf(path: str) -> tuple[ModelConfig, Weights]:
    """The config and float32 copies of the tensors in Hugging Face order (LLaMA's Q and K rows
    put back), for code that wants arrays."""
    return _read(path, native=False)  # type: ignore[return-value]


def _read(path: str, native: bool) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        return _read_tensors(path, native)
    except ValueError:
        raise
    except Exception as e:  # a parse that does not stop at our checks: name the file
        raise ValueError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from e


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (the inverse of convert_hf_to_gguf's ``permute``).

    llama.cpp's rope rotates adjacent pairs (x0, x1) where HF rotates the two halves of each
    head (x0, x_{d/2}), so the converter interleaves the halves of every head's rows.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_tensors(path: str, native: bool) -> tuple[ModelConfig, dict[str, Any]]:
    parsed = open_gguf(path)
    config = _gguf_config(parsed)
    if native and config.architecture == "llama":
        config.rope_interleaved = True
    weights: dict[str, Any] = {}
    for name, shape in expected_shapes(config).items():
        stored_name = gguf_name(name)
        info = parsed.tensors.get(stored_name)
        if info is None:
            raise ValueError(f"{path}: missing tensor {stored_name!r} (for {name!r})")
        check_shape(path, f"{stored_name} ({name})", info.shape, shape)
        tensor = parsed.tensor(stored_name, name)
        if native:
            weights[name] = tensor
            continue
        w = tensor.to_float()
        if config.architecture == "llama":
            if ".self_attn.q_proj." in name:
                w = _unpermute_rows(w, config.num_heads)
            elif ".self_attn.k_proj." in name:
                w = _unpermute_rows(w, config.num_kv_heads)
        weights[name] = np.ascontiguousarray(w, dtype=np.float32)
    return config, weights


def _gguf_config(parsed: GGUFFile) -> ModelConfig:
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
    for key, value in hf.items():
        if key != "model_type" and isinstance(value, (str, list, dict)):
            raise ValueError(f"{path}: GGUF metadata for {key} is {value!r}, not a number")
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
        hf["rope_scaling"] = _llama3_rope_from_factors(
            path,
            parsed.tensor("rope_freqs.weight").to_float(),
            head_dim,
            float(hf["rope_theta"]),
            int(field(f"{arch}.rope.scaling.original_context_length", 8192)),
        )
    return ModelConfig.from_hf_dict(hf, source=path)


def _gguf_vocab_size(parsed: GGUFFile) -> int:
    tokens = parsed.field("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        return len(tokens)
    if "token_embd.weight" in parsed.tensors:
        return int(parsed.tensors["token_embd.weight"].shape[0])
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

