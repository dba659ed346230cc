"""Bad input raises a clear exception and leaves the decoder usable with its state intact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ffnskip_ext


@pytest.fixture()
def decoder(tiny_model_dir):
    _, path = tiny_model_dir("llama_mha_tied")
    return ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=16)


def assert_state_kept(decoder, position: int, logits_after: np.ndarray, next_token: int) -> None:
    """The rejected call changed nothing: the next step gives the same logits as before."""
    assert decoder.position == position
    np.testing.assert_array_equal(decoder.step(next_token), logits_after)


@pytest.mark.parametrize(
    "bad_prompt, exc, message",
    [
        ([], ValueError, "empty prompt"),
        ([1, 256], ValueError, "token id 256 at index 1 is outside the vocabulary"),
        ([-1], ValueError, "token id -1"),
        ([1, 2**40], ValueError, "outside the vocabulary"),
        ([1, 2**70], ValueError, "outside the vocabulary"),
        (np.array([[1, 2]]), ValueError, "1-D"),
        ([1.5, 2.0], TypeError, "integers"),
        ("hello", TypeError, "tokenize"),
        (list(range(1, 20)), ValueError, "exceed max_seq_len 16"),
    ],
)
def test_bad_prefill(decoder, tiny_model_dir, bad_prompt, exc, message) -> None:
    reference = ffnskip_ext.Decoder.from_pretrained(tiny_model_dir("llama_mha_tied")[1])
    reference.prefill([3, 4])
    expected_next = reference.step(5)

    decoder.prefill([3, 4])
    with pytest.raises(exc, match=message):
        decoder.prefill(bad_prompt)
    assert_state_kept(decoder, 2, expected_next, 5)


@pytest.mark.parametrize(
    "token, exc", [(256, ValueError), (-3, ValueError), (2**64, ValueError), (1.0, TypeError)]
)
def test_bad_step(decoder, token, exc) -> None:
    decoder.prefill([3, 4])
    before = decoder.position
    with pytest.raises(exc):
        decoder.step(token)
    assert decoder.position == before
    decoder.step(5)
    assert decoder.position == before + 1


def test_context_overflow_on_step(decoder) -> None:
    decoder.prefill(list(range(1, 16)))
    decoder.step(1)
    assert decoder.position == 16
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        decoder.step(2)
    assert decoder.position == 16
    decoder.reset()
    assert decoder.prefill([1]).shape == (256,)


def test_nonexistent_path(tmp_path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        ffnskip_ext.Decoder.from_pretrained(missing)


def test_directory_without_config(tmp_path) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="config.json"):
        ffnskip_ext.Decoder.from_pretrained(tmp_path)


def test_unsupported_architecture(tiny_model_dir, tmp_path) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    target = tmp_path / "gpt2"
    shutil.copytree(path, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "gpt2"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gpt2"):
        ffnskip_ext.Decoder.from_pretrained(target)


def test_missing_and_misshaped_tensor_reach_the_engine_check(tiny_model_dir) -> None:
    model, path = tiny_model_dir("llama_mha_tied")
    config, weights = ffnskip_ext.load_checkpoint(path)
    name = "model.layers.1.mlp.up_proj.weight"
    missing = {k: v for k, v in weights.items() if k != name}
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        ffnskip_ext.Decoder(config, missing)
    misshaped = dict(weights)
    misshaped[name] = weights[name][:, :-1]
    with pytest.raises(ValueError, match=rf"'{name}' has shape \[160, 63\], expected \[160, 64\]"):
        ffnskip_ext.Decoder(config, misshaped)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_kv_heads", 3, "num_kv_heads"),
        ("hidden_size", 0, "hidden_size"),
        ("head_dim", -2, "head_dim"),
        ("rope_type", "yarn", "rope_type"),
    ],
)
def test_invalid_config_values(tiny_model_dir, field, value, message) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    config, weights = ffnskip_ext.load_checkpoint(path)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        ffnskip_ext.Decoder(config, weights)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(max_seq_len=-5), "max_seq_len"),
        (dict(num_threads=0), "num_threads"),
        (dict(device="tpu"), "device"),
        (dict(dtype="int8"), "dtype"),
        (dict(max_seq_len=10**9), "KV cache"),
        (dict(max_seq_len=10**12), "max_seq_len"),
    ],
)
def test_invalid_decoder_options(tiny_model_dir, kwargs, message) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    with pytest.raises(ValueError, match=message):
        ffnskip_ext.Decoder.from_pretrained(path, **kwargs)


@pytest.mark.parametrize("isa", ["avx9", "AVX2"])
def test_unknown_cpu_isa_is_a_clear_error(tiny_model_dir, isa) -> None:
    """FFNSKIP_CPU_ISA is read once per process, so in a child process."""
    _, path = tiny_model_dir("llama_mha_tied")
    code = (
        "import sys, ffnskip_ext\n"
        "try:\n    ffnskip_ext.Decoder.from_pretrained(sys.argv[1])\n"
        "except ValueError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, FFNSKIP_CPU_ISA=isa))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"FFNSKIP_CPU_ISA={isa}: expected avx512, avx2 or default" in done.stdout


def test_cuda_without_cuda_build_is_a_clear_error(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    with pytest.raises(ValueError, match="cuda"):
        ffnskip_ext.Decoder.from_pretrained(path, device="cuda")
