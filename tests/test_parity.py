"""The engine against transformers in fp32: prefill logits, then greedy decode step by step."""

from __future__ import annotations

import numpy as np
import pytest

import ffnskip_ext
from conftest import TINY_VARIANTS, hf_greedy, hf_logits

DECODE_STEPS = 32


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, where: str) -> None:
    tolerance = 1e-3 * float(ref.max() - ref.min())
    err = float(np.abs(ours - ref).max())
    assert err <= tolerance, f"{where}: max |diff| {err:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_tiny_model_matches_transformers(tiny_model_dir, variant: str) -> None:
    model, path = tiny_model_dir(variant)
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=128)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, model.config.vocab_size, size=11).tolist()

    expected_tokens = hf_greedy(model, prompt, DECODE_STEPS)
    ref = hf_logits(model, prompt + expected_tokens)

    logits = decoder.prefill(prompt)
    assert logits.shape == (model.config.vocab_size,) and logits.dtype == np.float32
    assert_logits_close(logits, ref[len(prompt) - 1], "prefill")
    ours: list[int] = []
    for i in range(DECODE_STEPS):
        ours.append(int(np.argmax(logits)))
        logits = decoder.step(expected_tokens[i])  # teacher-forced on the reference tokens
        assert_logits_close(logits, ref[len(prompt) + i], f"decode step {i}")
    assert ours == expected_tokens
    assert decoder.position == len(prompt) + DECODE_STEPS


LONG_PREFILLS = [("llama_gqa_untied_h72", n) for n in (12, 63, 64, 150)] + [
    (variant, 150) for variant in sorted(TINY_VARIANTS) if variant != "llama_gqa_untied_h72"
]


@pytest.mark.parametrize(("variant", "length"), LONG_PREFILLS)
def test_long_prefill_matches_transformers(tiny_model_dir, variant: str, length: int) -> None:
    """Prompts that take the CPU's many-token GEMMs (AVX-512: 32-row panels x 12-token groups,
    rows and tokens left over; otherwise 4x4 tiles in 64-token blocks), on every tiny variant
    (biases, tied heads, widths that are no multiple of 32): every position's K/V feeds the
    last token's logits."""
    model, path = tiny_model_dir(variant)
    prompt = np.random.default_rng(length).integers(0, model.config.vocab_size, size=length)
    logits = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=160).prefill(prompt.tolist())
    assert_logits_close(logits, hf_logits(model, prompt.tolist())[-1], f"prefill of {length}")


def test_prefill_in_chunks_equals_one_prefill(tiny_model_dir) -> None:
    model, path = tiny_model_dir("llama_gqa_untied_h72")
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, size=40).tolist()
    whole = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64).prefill(tokens)
    chunked = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    chunked.prefill(tokens[:13])
    chunked.prefill(tokens[13:30])
    for t in tokens[30:-1]:
        chunked.step(t)
    last = chunked.step(tokens[-1])
    np.testing.assert_allclose(last, whole, atol=1e-4 * float(np.ptp(whole)))


def test_reset_reproduces_logits(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=32)
    first = decoder.prefill([1, 2, 3])
    decoder.step(4)
    decoder.reset()
    assert decoder.position == 0
    np.testing.assert_array_equal(decoder.prefill([1, 2, 3]), first)


def test_from_hf_model_equals_from_pretrained(tiny_model_dir) -> None:
    model, path = tiny_model_dir("qwen2_qkv_bias")
    a = ffnskip_ext.Decoder.from_hf_model(model, max_seq_len=16).prefill([5, 6, 7])
    b = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=16).prefill([5, 6, 7])
    np.testing.assert_array_equal(a, b)


def test_thread_counts_agree(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_gqa_untied_h72")
    prompt = list(range(1, 30))
    one = ffnskip_ext.Decoder.from_pretrained(path, num_threads=1).prefill(prompt)
    two = ffnskip_ext.Decoder.from_pretrained(path, num_threads=2).prefill(prompt)
    np.testing.assert_array_equal(one, two)
