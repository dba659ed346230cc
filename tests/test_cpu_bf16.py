"""bf16 weight storage on the CPU: fp32 activations and accumulation over rounded weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ffnskip_ext
from conftest import TINY_VARIANTS, hf_logits


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_bf16_error_is_within_twice_pytorch_bf16(tiny_model_dir, variant) -> None:
    """Against the fp32 model, our bf16 logits may err at most twice as much as transformers
    running the same model in bf16 (plus 1e-4 of the logit range)."""
    model, path = tiny_model_dir(variant)
    tokens = np.random.default_rng(5).integers(0, model.config.vocab_size, size=24).tolist()
    ref = hf_logits(model, tokens)
    bf16_model = type(model)(model.config).eval()
    bf16_model.load_state_dict(model.state_dict())
    torch_error = relative_error(hf_logits(bf16_model.to(torch.bfloat16), tokens), ref)

    decoder = ffnskip_ext.Decoder.from_pretrained(path, dtype="bfloat16", max_seq_len=64)
    assert decoder.dtype == "bfloat16"
    ours = [decoder.prefill(tokens[:8])]
    ours += [decoder.step(t) for t in tokens[8:]]
    ours_error = relative_error(np.array(ours), ref[7:])
    assert ours_error <= 2 * torch_error + 1e-4, (ours_error, torch_error)
    assert ours_error > 0  # the weights really were rounded


def test_bf16_keeps_greedy_choices_of_fp32_on_smollm2() -> None:
    from conftest import smollm2_path

    path = smollm2_path()
    fp32 = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=256)
    bf16 = ffnskip_ext.Decoder.from_pretrained(path, dtype="bf16", max_seq_len=256)
    tokenizer = ffnskip_ext.load_tokenizer(path)
    reference = ffnskip_ext.generate(
        fp32, tokenizer, [{"role": "user", "content": "Explain how rain forms."}],
        max_new_tokens=48,
    )
    prompt = ffnskip_ext.encode_prompt(
        tokenizer, [{"role": "user", "content": "Explain how rain forms."}]
    )
    logits = bf16.prefill(prompt)
    agree = 0
    for token in reference.token_ids:
        agree += int(np.argmax(logits)) == token
        logits = bf16.step(token)
    assert agree / len(reference.token_ids) >= 0.9, agree


def test_float16_on_cpu_is_a_clear_error(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    with pytest.raises(ValueError, match="float16 is not supported by the CPU backend"):
        ffnskip_ext.Decoder.from_pretrained(path, dtype="float16")
