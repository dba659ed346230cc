"""SmolLM2-135M-Instruct (the bundled GGUF) against transformers loading the same file."""

from __future__ import annotations

import os

import numpy as np
import pytest

import ffnskip_ext
from conftest import hf_greedy, smollm2_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

NEW_TOKENS = 64
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Explain photosynthesis in two sentences."},
    ],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime."}],
]


@pytest.fixture(scope="module")
def path() -> str:
    return smollm2_path()


@pytest.fixture(scope="module")
def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )


@pytest.fixture(scope="module")
def decoder(path):
    """The exact reference path (weights dequantised to fp32), as transformers reads the file;
    tests/test_quantized_models.py covers the weights read as stored."""
    return ffnskip_ext.Decoder.from_pretrained(path, dtype="float32", max_seq_len=512)


@pytest.fixture(scope="module")
def tokenizer(path):
    return ffnskip_ext.load_tokenizer(path)


def test_tokenizer_and_chat_template_match_transformers(tokenizer, hf_tokenizer) -> None:
    text = "Hello, world! Ünïcödé and numbers 12345.\nNew line."
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    ours, ref = tokenizer.encode(text), hf_tokenizer.encode(text)
    assert tokenizer.decode(ours) == hf_tokenizer.decode(ref)
    for messages in CONVERSATIONS:
        ours = ffnskip_ext.encode_prompt(tokenizer, messages)
        ref = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ref, "input_ids") or isinstance(ref, dict):
            ref = ref["input_ids"]
        assert ours == list(ref)
    assert tokenizer.chat_template == hf_tokenizer.chat_template


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_greedy_tokens_match_transformers(decoder, tokenizer, hf_model, conversation) -> None:
    messages = CONVERSATIONS[conversation]
    prompt = ffnskip_ext.encode_prompt(tokenizer, messages)
    expected = hf_greedy(hf_model, prompt, NEW_TOKENS)

    decoder.reset()
    logits = decoder.prefill(prompt)
    ours = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(logits))
        ours.append(token)
        logits = decoder.step(token)
    diverged = [i for i, (a, b) in enumerate(zip(ours, expected, strict=True)) if a != b]
    assert not diverged, f"first divergence at token {diverged[0]}"


def test_generate_returns_text_tokens_and_timings(decoder, tokenizer) -> None:
    pieces: list[str] = []
    result = ffnskip_ext.generate(
        decoder, tokenizer, CONVERSATIONS[0], max_new_tokens=24, stream=pieces.append
    )
    assert "Paris" in result.text
    assert "".join(pieces) == result.text
    assert result.token_ids and result.prefill_ms > 0
    assert result.finish_reason in ("eos", "length")
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
