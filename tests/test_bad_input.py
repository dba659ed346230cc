"""Bad input raises a clear exception and leaves the decoder usable with its state intact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


class RecordingTokenizer:
    """Byte tokenizer with a chat template that fails on what jinja2 would: generation
    arguments must be refused before it is asked anything."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return self.encode("".join(m["role"] + ":" + m["content"] for m in messages))


@pytest.mark.parametrize(
    "prompt, kwargs, exc, message",
    [
        ("a\udc80b", {}, ValueError, r"prompt: lone surrogate '\\udc80' at index 1"),
        ([{"role": "user", "content": None}], {}, TypeError,
         r"messages\[0\]\['content'\] must be a string, got NoneType"),
        ([{"role": "user", "content": "x\ud800"}], {}, ValueError,
         r"messages\[0\]\['content'\]: lone surrogate"),
        ("hi", dict(stop=[5]), TypeError, "stop must be a string or a list of strings"),
        ("hi", dict(stop="\udc80"), ValueError, "stop: lone surrogate"),
        ("hi", dict(seed=1.5), TypeError, "seed"),
        ("hi", dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
        ("hi", dict(top_k=np.float32(2)), ValueError, "top_k"),
        ("hi", dict(min_p=1.5), ValueError, "min_p"),
        ("hi", dict(repeat_penalty=0.0), ValueError, "repeat_penalty"),
    ],
)
def test_generation_arguments_are_refused_before_any_work(decoder, prompt, kwargs, exc,
                                                          message) -> None:
    logits_after = decoder.prefill([1, 2])
    decoder.reset()
    decoder.prefill([1])
    with pytest.raises(exc, match=message):
        ffnskip_ext.generate(decoder, RecordingTokenizer(), prompt, **kwargs)
    decoder.reset()
    np.testing.assert_array_equal(decoder.prefill([1, 2]), logits_after)


def test_session_refuses_bad_messages_and_stays_usable(decoder) -> None:
    session = ffnskip_ext.ChatSession(decoder, RecordingTokenizer())
    first = session.generate("hi", max_new_tokens=3)
    with pytest.raises(TypeError, match="content"):
        session.generate([{"role": "user", "content": None}])
    assert session.generate("hi", max_new_tokens=3).token_ids == first.token_ids


def test_numpy_scalars_are_accepted_for_generation_arguments(decoder) -> None:
    tokenizer = RecordingTokenizer()
    want = ffnskip_ext.generate(decoder, tokenizer, "hi", max_new_tokens=5, temperature=0.7,
                                top_k=20, top_p=0.9, seed=3)
    got = ffnskip_ext.generate(decoder, tokenizer, "hi", max_new_tokens=np.int64(5),
                               temperature=np.float32(0.7), top_k=np.int32(20),
                               top_p=np.float64(0.9), seed=np.int64(3))
    assert got.token_ids == want.token_ids


def test_a_str_stop_is_one_stop_string(decoder) -> None:
    tokenizer = RecordingTokenizer()
    tokenizer.eos_token_id = None
    full = ffnskip_ext.generate(decoder, tokenizer, "hi", max_new_tokens=12)
    assert len(full.text) >= 2
    # Its characters as separate stop strings would end the text at the first one of them.
    stop = full.text[-1] + full.text[0]
    cut = ffnskip_ext.generate(decoder, tokenizer, "hi", max_new_tokens=12, stop=stop)
    assert cut.text == full.text.split(stop)[0]
    assert cut.finish_reason == ("stop" if stop in full.text else "length")
    assert ffnskip_ext.generate(decoder, tokenizer, "hi", max_new_tokens=12,
                                stop=[stop]).text == cut.text


@pytest.mark.parametrize("temperature", [1e-308, 1e-320, 5e-324])
def test_tiny_temperatures_pick_the_most_likely_token(decoder, temperature) -> None:
    tokenizer = RecordingTokenizer()
    greedy = ffnskip_ext.generate(decoder, tokenizer, "hi", max_new_tokens=6)
    tiny = ffnskip_ext.generate(decoder, tokenizer, "hi", max_new_tokens=6,
                                temperature=temperature, top_p=0.9, seed=0)
    assert tiny.token_ids == greedy.token_ids


def test_non_regular_files_are_refused_without_waiting(tmp_path) -> None:
    """A FIFO would block open() until a writer came; /proc/self/mem cannot be read."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    script = (
        "import sys, ffnskip_ext\n"
        "for path in sys.argv[1:]:\n"
        "    for load in (ffnskip_ext.Decoder.from_pretrained, ffnskip_ext.load_tokenizer):\n"
        "        try:\n"
        "            load(path)\n"
        "        except ValueError as e:\n"
        "            print('refused', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(fifo), "/proc/self/mem"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused") == 4, done.stdout


def test_huge_safetensors_header_length_is_refused_before_reading(tiny_model_dir,
                                                                  tmp_path) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    shutil.copytree(path, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (3 << 30).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="header length 3221225472 exceeds"):
        ffnskip_ext.Decoder.from_pretrained(tmp_path / "m")


def test_hf_directory_without_tokenizer_files(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    with pytest.raises(ValueError, match="no tokenizer files"):
        ffnskip_ext.load_tokenizer(path)


def test_gguf_special_token_id_outside_the_vocabulary(tmp_path) -> None:
    from conftest import smollm2_path

    data = bytearray(Path(smollm2_path()).read_bytes())
    key = b"tokenizer.ggml.bos_token_id"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4  # value type uint32
    data[at + 4:at + 8] = (10**9).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bos_token_id 1000000000 is outside the vocabulary"):
        ffnskip_ext.load_tokenizer(bad)
