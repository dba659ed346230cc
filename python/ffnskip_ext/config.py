"""Model configuration shared by the loaders, the native engine and the tests.

Field names follow the engine (``csrc/include/ffnskip/config.h``); ``from_hf_dict`` maps a
Hugging Face ``config.json``. Value checks (positive sizes, head counts that divide) live in
the C++ core so that every user of the library gets them; this module only maps names and
rejects architectures the engine does not implement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import _core

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclasses.dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # "default" or "llama3" (the piecewise frequency scaling of LLaMA 3.1+).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    # Q and K rows in llama.cpp's order (a llama GGUF read as stored): RoPE rotates adjacent
    # pairs instead of the halves of each head (the same attention).
    rope_interleaved: bool = False
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a transformers config dict; ``source`` names it in error messages."""
        arch = hf.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: unsupported architecture model_type={arch!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if arch == "qwen2" and hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")

        def need(key: str) -> Any:
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r}")
            return hf[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = hf.get("head_dim")
        if not head_dim:
            if heads <= 0 or hidden % heads:
                raise ValueError(f"{source}: num_attention_heads ({heads}) must divide "
                                 f"hidden_size ({hidden}) when head_dim is not given")
            head_dim = hidden // heads

        rope = _rope_parameters(hf)
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported")

        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (
            (int(eos),) if eos is not None else ()
        )
        attention_bias = bool(hf.get("attention_bias", False))
        config = cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            # Defaults for missing keys are those of transformers' LlamaConfig / Qwen2Config.
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=False if arch == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(
                hf.get("max_position_embeddings", 32768 if arch == "qwen2" else 2048)
            ),
            eos_token_ids=eos_ids,
        )
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Raises ValueError naming the first invalid field (the engine's own checks), before
        anything is sized from these values."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and not -(2**31) <= value < 2**31:
                raise ValueError(f"{source}: {field.name}={value} is out of range")
        try:
            _core.validate_config(self)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes ``rope_parameters``; older configs write ``rope_scaling``."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        return {}
    return params
