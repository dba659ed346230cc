"""Shared fixtures: tiny random transformers models saved to disk, and the bundled SmolLM2."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture
def sigint_reaches_children() -> Iterator[None]:
    """For tests that press Ctrl-C in a child. A shell starts background jobs with SIGINT
    ignored and a child inherits that (Python then keeps ignoring it), so such a test would fail
    for the wrong reason; while it runs, this process catches SIGINT instead, and exec resets a
    caught signal to the default in the child."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

# Variants the engine must reproduce. Larger-than-default init makes logits spread out, so a
# greedy comparison is not decided by float rounding between near-equal candidates.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "llama_mha_tied": dict(
        arch="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "llama_gqa_untied_h72": dict(
        arch="llama", hidden_size=72, intermediate_size=200, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama3_rope_scaling": dict(
        arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_head_dim_attention_bias": dict(
        arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, attention_bias=True,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "qwen2_qkv_bias": dict(
        arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}


def build_tiny_model(variant: str, vocab_size: int = 256, seed: int = 0) -> Any:
    spec = dict(TINY_VARIANTS[variant])
    arch = spec.pop("arch")
    config_cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    model_cls = (
        transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    )
    config = config_cls(
        vocab_size=vocab_size, max_position_embeddings=256, initializer_range=0.15,
        rms_norm_eps=1e-5, **spec,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: randomise them so they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Saves each variant once per session; returns (variant) -> (model, directory)."""
    cache: dict[str, tuple[Any, Path]] = {}

    def get(variant: str) -> tuple[Any, Path]:
        if variant not in cache:
            model = build_tiny_model(variant)
            path = tmp_path_factory.mktemp(variant)
            model.save_pretrained(path)
            cache[variant] = (model, path)
        return cache[variant]

    return get


def smollm2_path() -> str:
    from ffnskip_ext.loaders.models import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def hf_logits(model: Any, token_ids: list[int]) -> np.ndarray:
    """Logits [len, vocab] of one uncached causal forward: the reference for every position."""
    with torch.inference_mode():
        out = model(torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain argmax decoding with transformers' KV cache: no logits processors (generate()'s
    min_new_tokens would mask EOS), so it continues past EOS exactly as the engine does."""
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(
                torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer random LLaMA with a byte-level tokenizer and a chat template saved beside
    it: a complete model directory for CLI and calibration tests that run in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # sorted: alphabet() returns a set, and token ids must not change from run to run
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(
        sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|end|>", chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_chat")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
