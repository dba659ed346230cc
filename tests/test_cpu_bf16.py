"""16-bit weight storage on the CPU (bf16, fp16): fp32 activations and accumulation over
rounded weights, on every instruction set the kernels are compiled for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

import ffnskip_ext
from conftest import TINY_VARIANTS, hf_greedy, hf_logits

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ISAS = ("default", "avx2", "avx512")  # lowest first
PROMPT = 10  # prefill length: two 4-token tiles and two single tokens


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def copy_model(model: Any) -> Any:
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def with_rounded_matrices(model: Any, dtype: str) -> Any:
    """The fp32 model with what the engine stores in `dtype` rounded to it: the weight matrices
    and the embedding (norms and biases stay fp32). Equal to the engine up to summation order."""
    copy = copy_model(model)
    with torch.no_grad():
        for p in copy.parameters():
            if p.ndim == 2:
                p.copy_(p.to(HALF[dtype]).float())
    return copy


def ours_teacher_forced(decoder: ffnskip_ext.Decoder, tokens: list[int]) -> np.ndarray:
    """Logits after tokens[PROMPT - 1:], from one prefill and then single steps."""
    logits = [decoder.prefill(tokens[:PROMPT])]
    logits += [decoder.step(t) for t in tokens[PROMPT:]]
    return np.array(logits)


@pytest.mark.parametrize("dtype", sorted(HALF))
@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_half_weights_match_rounded_fp32_and_beat_pytorch(tiny_model_dir, variant, dtype) -> None:
    """Our logits equal the fp32 model's on rounded weights (so rounding is to nearest even and
    widening exact), and against the fp32 model err at most twice as much as transformers
    running it in that dtype (plus 1e-4 of the logit range)."""
    model, path = tiny_model_dir(variant)
    tokens = np.random.default_rng(5).integers(0, model.config.vocab_size, size=24).tolist()
    ref = hf_logits(model, tokens)[PROMPT - 1:]
    rounded = hf_logits(with_rounded_matrices(model, dtype), tokens)[PROMPT - 1:]
    torch_error = relative_error(hf_logits(copy_model(model).to(HALF[dtype]), tokens)[
        PROMPT - 1:], ref)

    decoder = ffnskip_ext.Decoder.from_pretrained(path, dtype=dtype, max_seq_len=64)
    assert decoder.dtype == dtype
    ours = ours_teacher_forced(decoder, tokens)
    assert relative_error(ours, rounded) < 1e-5
    ours_error = relative_error(ours, ref)
    assert ours_error <= 2 * torch_error + 1e-4, (ours_error, torch_error)
    assert ours_error > 0  # the weights really were rounded


# Run in a child process: the instruction set is chosen once per process.
CHILD = """
import json, sys
import numpy as np
import ffnskip_ext
path, dtype, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
prompt, steps = int(sys.argv[4]), int(sys.argv[5])
decoder = ffnskip_ext.Decoder.from_pretrained(path, dtype=dtype, max_seq_len=64)
logits = [decoder.prefill(tokens[:prompt])] + [decoder.step(t) for t in tokens[prompt:]]
greedy = []
last = logits[-1]
for _ in range(steps):
    greedy.append(int(np.argmax(last)))
    last = decoder.step(greedy[-1])
print(json.dumps({"isa": ffnskip_ext.build_info()["cpu_isa"], "greedy": greedy,
                  "logits": np.array(logits).tolist()}))
"""


def run_with_isa(isa: str, path: Any, dtype: str, tokens: list[int], steps: int) -> dict:
    env = dict(os.environ, FFNSKIP_CPU_ISA=isa)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), dtype, json.dumps(tokens), str(PROMPT),
         str(steps)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("dtype", ["float32", *sorted(HALF)])
@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set_matches_and_decodes_greedily(tiny_model_dir, isa, dtype) -> None:
    """FFNSKIP_CPU_ISA forces each kernel set this CPU can run: logits on the rounded weights
    and greedy tokens as transformers gives them."""
    best = ffnskip_ext.build_info()["cpu_isa"]
    if ISAS.index(isa) > ISAS.index(best):
        pytest.skip(f"this CPU runs at most {best}")
    model, path = tiny_model_dir("llama_gqa_untied_h72")  # 72 = 2 * 32 + 8: a scalar tail
    reference = with_rounded_matrices(model, dtype) if dtype in HALF else model
    tokens = np.random.default_rng(6).integers(0, model.config.vocab_size, size=20).tolist()
    steps = 16

    child = run_with_isa(isa, path, dtype, tokens, steps)
    assert child["isa"] == isa
    ref = hf_logits(reference, tokens)[PROMPT - 1:]
    assert relative_error(np.array(child["logits"], np.float32), ref) < 1e-5
    assert child["greedy"] == hf_greedy(reference, tokens, steps)


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_half_keeps_greedy_choices_of_fp32_on_smollm2(dtype) -> None:
    from conftest import smollm2_path

    path = smollm2_path()
    fp32 = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=256)
    half = ffnskip_ext.Decoder.from_pretrained(path, dtype=dtype, max_seq_len=256)
    tokenizer = ffnskip_ext.load_tokenizer(path)
    reference = ffnskip_ext.generate(
        fp32, tokenizer, [{"role": "user", "content": "Explain how rain forms."}],
        max_new_tokens=48,
    )
    prompt = ffnskip_ext.encode_prompt(
        tokenizer, [{"role": "user", "content": "Explain how rain forms."}]
    )
    logits = half.prefill(prompt)
    agree = 0
    for token in reference.token_ids:
        agree += int(np.argmax(logits)) == token
        logits = half.step(token)
    assert agree / len(reference.token_ids) >= 0.9, agree
