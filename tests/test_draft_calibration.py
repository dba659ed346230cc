"""calibrate_draft() (``ffnskip calibrate --for speculation``) on a small complete model: its
agreement measurement, its speed model and its result, which must verify losslessly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import ffnskip_ext
from ffnskip_ext import FFNSkipPolicy, Speculative, SubBlockSkip
from ffnskip_ext.tuning import calibrate_draft
from ffnskip_ext.tuning.calibration import dense_references
from ffnskip_ext.tuning.draft import Costs, draft_agreement, predicted_speedup

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("hello there", "tell me a story", "numbers: 1 2 3")]


@pytest.fixture(scope="module")
def model(tiny_chat_model_dir):
    decoder = ffnskip_ext.Decoder.from_pretrained(tiny_chat_model_dir, max_seq_len=160)
    return decoder, ffnskip_ext.load_tokenizer(tiny_chat_model_dir)


def test_a_draft_that_skips_nothing_agrees_everywhere(model) -> None:
    """The dense model as its own draft predicts every dense greedy token: the backwards
    draft steps read only the dense context."""
    decoder, tokenizer = model
    refs = dense_references(decoder, tokenizer, PROMPTS, 12, progress=False)
    agreement, seconds = draft_agreement(decoder, SubBlockSkip(), refs)
    assert agreement == 1.0 and seconds > 0
    layers = decoder.config.num_layers
    damaged, _ = draft_agreement(decoder, SubBlockSkip(attention=tuple(range(layers)),
                                                       ffn=tuple(range(layers))), refs)
    assert damaged < 1.0


def test_speed_model() -> None:
    costs = Costs(step=1.0, attention=0.01, ffn=0.02, verify=(1.0, 1.1, 1.2, 1.3))
    speedup, k = predicted_speedup(1.0, 0.1, costs, 3)  # perfect cheap draft: longest pays
    assert k == 3 and speedup == pytest.approx(4 / (0.3 + 1.3))
    speedup, k = predicted_speedup(0.0, 0.1, costs, 3)  # never accepted: a loss
    assert k == 1 and speedup == pytest.approx(1 / 1.2)
    assert costs.draft_step(SubBlockSkip(attention=(0, 1), ffn=(2,))) == pytest.approx(0.96)


def test_calibrated_draft_is_lossless_and_reported(model) -> None:
    decoder, tokenizer = model
    found = calibrate_draft(decoder, tokenizer, PROMPTS, max_new_tokens=16, max_draft=4,
                            positions=24, confirm=2, rounds=1, progress=False)
    assert isinstance(found.policy, (SubBlockSkip, FFNSkipPolicy))
    assert 1 <= found.max_draft <= 4 and found.measured_speedup > 0
    assert 0 <= found.agreement <= 1 and len(found.candidates) >= 4
    assert found.costs.step > 0 and len(found.costs.verify) == 5
    assert isinstance(decoder.policy, ffnskip_ext.DensePolicy)
    spec = Speculative(draft="self", draft_policy=found.policy, max_draft=found.max_draft)
    for prompt in PROMPTS:
        plain = ffnskip_ext.generate(decoder, tokenizer, prompt, max_new_tokens=20)
        fast = ffnskip_ext.generate(decoder, tokenizer, prompt, max_new_tokens=20,
                                    speculative=spec)
        assert fast.token_ids == plain.token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_draft=0), "max_draft"), (dict(max_new_tokens=1), "max_new_tokens"),
    (dict(positions=0), "positions"), (dict(confirm=True), "confirm"),
])
def test_bad_arguments(model, kwargs, message) -> None:
    decoder, tokenizer = model
    with pytest.raises(ValueError, match=message):
        calibrate_draft(decoder, tokenizer, PROMPTS, progress=False, **kwargs)


def test_a_non_dense_decoder_is_refused(model) -> None:
    decoder, tokenizer = model
    decoder.set_policy(ffnskip_ext.StaticFFNSkip([1]))
    try:
        with pytest.raises(ValueError, match="dense decoder"):
            calibrate_draft(decoder, tokenizer, PROMPTS, progress=False)
    finally:
        decoder.set_policy(ffnskip_ext.DensePolicy())


def test_cli_writes_a_draft_policy(tiny_chat_model_dir, tmp_path) -> None:
    out = tmp_path / "draft.json"
    done = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "calibrate", "--for", "speculation", "--model",
         str(tiny_chat_model_dir), "--out", str(out), "--max-new-tokens", "12",
         "--draft-max", "3", "--quiet"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "plain decoding on the calibration prompts" in done.stderr
    assert "--speculative self --draft-policy" in done.stderr
    ffnskip_ext.load_policy(out)  # a valid policy file
    assert json.loads(out.read_text())["kind"] in ("sub_block", "ffn_skip")
    generated = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "generate", "hi", "--model",
         str(tiny_chat_model_dir), "--max-new-tokens", "8", "--speculative", "self",
         "--draft-policy", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr


def test_cli_refuses_a_target_for_speculation(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "calibrate", "--for", "speculation", "--target",
         "0.2", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "d.json")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--target is for --for skip-ratio" in done.stderr
