"""Sampling, generate() and the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import ffnskip_ext
from conftest import smollm2_path
from ffnskip_ext.runtime.sampling import SamplingParams, sample


class ByteTokenizer:
    """Token id = byte value + 1 (0 is EOS): enough to drive generate() on a tiny model."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


@pytest.fixture()
def decoder(tiny_model_dir):
    _, path = tiny_model_dir("llama_gqa_untied_h72")
    return ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=48)


def test_greedy_is_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0)) == 1


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    top_k = {sample(logits, SamplingParams(1.0, top_k=2), rng) for _ in range(300)}
    assert top_k == {0, 1}
    top_p = {sample(logits, SamplingParams(1.0, top_p=0.75), rng) for _ in range(300)}
    assert top_p == {0, 1}  # 0.5 is not enough, 0.5 + 0.3 covers 0.75
    everything = {sample(logits, SamplingParams(1.0), rng) for _ in range(2000)}
    assert everything == {0, 1, 2, 3}


def test_sampling_frequencies_follow_the_distribution() -> None:
    probs = np.array([0.6, 0.3, 0.1])
    rng = np.random.default_rng(0)
    draws = [sample(np.log(probs), SamplingParams(1.0), rng) for _ in range(6000)]
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 6000, probs, atol=0.02)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_generate_rejects_bad_sampling_values(decoder, kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        ffnskip_ext.generate(decoder, ByteTokenizer(), "hi", **kwargs)
    assert decoder.prefill([1, 2]).shape == (256,)  # still usable


def test_generate_is_deterministic_with_a_seed(decoder) -> None:
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=50, seed=7)
    a = ffnskip_ext.generate(decoder, ByteTokenizer(), "abc", **kwargs)
    b = ffnskip_ext.generate(decoder, ByteTokenizer(), "abc", **kwargs)
    assert a.token_ids == b.token_ids
    c = ffnskip_ext.generate(decoder, ByteTokenizer(), "abc", **{**kwargs, "seed": 8})
    assert c.token_ids != a.token_ids


def test_generate_greedy_equals_manual_decode(decoder) -> None:
    tok = ByteTokenizer()
    result = ffnskip_ext.generate(decoder, tok, "hello", max_new_tokens=10)
    assert result.prompt_tokens == 5
    assert decoder.position == 5 + len(result.token_ids) - 1  # the last token is not fed back
    decoder.reset()
    logits = decoder.prefill(tok.encode("hello"))
    manual = []
    for _ in range(len(result.token_ids)):
        manual.append(int(np.argmax(logits)))
        logits = decoder.step(manual[-1])
    assert result.token_ids == manual


def test_stop_string_and_stream(decoder) -> None:
    tok = ByteTokenizer()
    free = ffnskip_ext.generate(decoder, tok, "xyz", max_new_tokens=20)
    assert len(free.text) >= 4
    stop = free.text[2:4]
    pieces: list[str] = []
    stopped = ffnskip_ext.generate(
        decoder, tok, "xyz", max_new_tokens=20, stop=[stop], stream=pieces.append
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert "".join(pieces) == stopped.text


def test_generation_stops_at_a_full_context(decoder) -> None:
    result = ffnskip_ext.generate(decoder, ByteTokenizer(), "a" * 40, max_new_tokens=100)
    assert result.finish_reason in ("length", "eos")
    assert decoder.position <= decoder.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        ffnskip_ext.generate(decoder, ByteTokenizer(), "a" * 48)


def test_cli_generate_on_the_default_model() -> None:
    smollm2_path()
    """With the weights dequantised to fp32 (the file's exact values) the answer is Paris; the
    default reads the Q4_1 weights as stored and, like llama.cpp on this file, tips the
    near-tie first token (tests/test_quantized_models.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "generate", "What is the capital of France?",
         "--max-new-tokens", "12", "--dtype", "float32"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "tokens/s" in done.stderr


def test_cli_reports_a_missing_model_cleanly(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "generate", "hi", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "nope" in done.stderr and "Traceback" not in done.stderr


def reference_probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                            min_p: float, repeat_penalty: float,
                            previous: list[int]) -> np.ndarray:
    """transformers' order, token by token: repetition penalty, temperature, top-k, top-p,
    min-p."""
    x = logits.astype(np.float64).copy()
    for t in set(previous):
        x[t] = x[t] / repeat_penalty if x[t] > 0 else x[t] * repeat_penalty
    x = x / temperature
    if top_k:
        x[x < np.sort(x)[-top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    kept, mass = [], 0.0
    for t in sorted(range(len(p)), key=lambda t: -p[t]):
        if mass >= top_p:
            break
        kept.append(t)
        mass += p[t]
    q = np.zeros_like(p)
    q[kept] = p[kept]
    q /= q.sum()
    q[q < min_p * q.max()] = 0.0
    return q / q.sum()


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, repeat_penalty", [
    (1.0, 0, 1.0, 0.0, 1.0), (0.7, 0, 1.0, 0.1, 1.0), (1.3, 20, 0.9, 0.05, 1.0),
    (1.0, 0, 1.0, 0.0, 1.5), (0.8, 10, 0.95, 0.2, 1.3), (1.0, 0, 1.0, 0.0, 0.7),
])
def test_sampling_distribution_matches_a_numpy_reference(temperature, top_k, top_p, min_p,
                                                         repeat_penalty) -> None:
    from ffnskip_ext.runtime.sampling import probabilities

    rng = np.random.default_rng(1)
    logits = (2.0 * rng.standard_normal(64)).astype(np.float32)
    previous = [3, 3, 10, int(np.argmax(logits)), 40]
    params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty)
    np.testing.assert_allclose(
        probabilities(logits, params, previous),
        reference_probabilities(logits, temperature, top_k, top_p, min_p, repeat_penalty,
                                previous), rtol=1e-6, atol=1e-12)


def test_repeat_penalty_applies_to_greedy_decoding() -> None:
    logits = np.array([1.0, 3.0, 2.5, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(repeat_penalty=1.3), rng, previous=[1]) == 2
    assert sample(logits, SamplingParams(repeat_penalty=1.1), rng, previous=[1]) == 1


def test_generate_passes_the_sequence_to_the_repeat_penalty(decoder) -> None:
    tokenizer = ByteTokenizer()
    plain = ffnskip_ext.generate(decoder, tokenizer, "abab", max_new_tokens=16)
    penalised = ffnskip_ext.generate(decoder, tokenizer, "abab", max_new_tokens=16,
                                     repeat_penalty=5.0)
    prompt = set(tokenizer.encode("abab"))
    assert len(set(penalised.token_ids) | prompt) > len(set(plain.token_ids) | prompt)
