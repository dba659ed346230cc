"""calibrate(), Block Influence and the CLI's policy options, on a small complete model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext.tuning.calibration import (
    CalibrationWarning,
    block_influence,
    calibrate,
    dense_references,
    rank_layers_for_drop,
    teacher_forced,
)

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("hello there", "what is up", "tell me a story", "numbers: 1 2 3")]
KWARGS = dict(max_new_tokens=40, warmup_tokens=4, progress=False)


@pytest.fixture(scope="module")
def model(tiny_chat_model_dir):
    decoder = ffnskip_ext.Decoder.from_pretrained(tiny_chat_model_dir, max_seq_len=128)
    return decoder, ffnskip_ext.load_tokenizer(tiny_chat_model_dir)


@pytest.mark.parametrize("target", [0.1, 0.2])
def test_calibrated_policy_hits_the_target_ratio(model, target) -> None:
    decoder, tokenizer = model
    before = ffnskip_ext.StaticFFNSkip([3])
    decoder.set_policy(before)
    policy = calibrate(decoder, tokenizer, PROMPTS, target, **KWARGS)
    assert isinstance(policy, ffnskip_ext.FFNSkipPolicy) and policy.warmup_tokens == 4
    assert decoder.policy == before  # calibration restores the decoder's policy
    refs = dense_references(decoder, tokenizer, PROMPTS, 40, progress=False)
    measured = teacher_forced(decoder, policy, refs)
    assert abs(measured.skip_ratio - target) <= 0.02, measured


def test_unreachable_target_returns_the_closest_policy_with_a_warning(model) -> None:
    decoder, tokenizer = model
    with pytest.warns(CalibrationWarning, match="no candidate reached.*closest"):
        policy = calibrate(decoder, tokenizer, PROMPTS, 0.95, **KWARGS)
    assert isinstance(policy, ffnskip_ext.FFNSkipPolicy)
    refs = dense_references(decoder, tokenizer, PROMPTS, 40, progress=False)
    assert 0 < teacher_forced(decoder, policy, refs).skip_ratio < 0.93
    with pytest.raises(ValueError, match="no candidate reached"):
        calibrate(decoder, tokenizer, PROMPTS, 0.95, strict=True, **KWARGS)
    with pytest.raises(ValueError, match="target_skip_ratio"):
        calibrate(decoder, tokenizer, PROMPTS, 1.5, **KWARGS)


def test_cli_writes_the_closest_policy_for_an_unreachable_target(tiny_chat_model_dir,
                                                                 tmp_path) -> None:
    out = tmp_path / "policy.json"
    command = [sys.executable, "-m", "ffnskip_ext", "calibrate", "--model",
               str(tiny_chat_model_dir), "--target", "0.95", "--out", str(out),
               "--max-new-tokens", "24", "--warmup-tokens", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "warning: no candidate reached" in done.stderr
    assert json.loads(out.read_text())["kind"] == ffnskip_ext.FFNSkipPolicy.kind
    strict = subprocess.run(command + ["--strict"], capture_output=True, text=True,
                            timeout=600)
    assert strict.returncode == 2 and "no candidate reached" in strict.stderr


def test_cli_checks_arguments_before_loading_the_model(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "calibrate", "--model",
         str(tmp_path / "absent"), "--target", "0.2", "--out", str(tmp_path / "p.json"),
         "--max-new-tokens", "8", "--warmup-tokens", "8"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "warmup_tokens 8 >= max_new_tokens 8" in done.stderr


@pytest.mark.parametrize("extra, message", [
    (["--max-skips", "0"], "budgets (--max-skips) must be integers >= 1"),
    (["--for", "speculation", "--max-skips", "2"], "--max-skips is for --for skip-ratio"),
])
def test_cli_checks_the_skip_budget_before_loading_the_model(tmp_path, extra, message) -> None:
    target = [] if "speculation" in extra else ["--target", "0.2"]
    done = run_cli("calibrate", "--model", str(tmp_path / "absent"), *target,
                   "--out", str(tmp_path / "p.json"), *extra)
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=8, warmup_tokens=8), "warmup_tokens 8 >= max_new_tokens 8"),
    (dict(max_new_tokens=40, warmup_tokens=4, budgets=(0,)), "must be integers >= 1 or None"),
    (dict(max_new_tokens=40, warmup_tokens=4, budgets=()), "must be integers >= 1 or None"),
    (dict(max_new_tokens=0, warmup_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=40, warmup_tokens=4, tolerance=0.0), "tolerance must be > 0"),
])
def test_arguments_are_checked_before_the_dense_references(model, kwargs, message,
                                                           monkeypatch) -> None:
    from ffnskip_ext.tuning import calibration

    def refused(*args, **kw):
        raise AssertionError("dense references computed before the arguments were checked")

    monkeypatch.setattr(calibration, "dense_references", refused)
    decoder, tokenizer = model
    with pytest.raises(ValueError, match=message):
        calibrate(decoder, tokenizer, PROMPTS, 0.2, progress=False, **kwargs)


def test_block_influence_ranks_layers(model) -> None:
    decoder, tokenizer = model
    sequences = [ffnskip_ext.encode_prompt(tokenizer, p) for p in PROMPTS]
    influence = block_influence(decoder, sequences)
    assert influence.shape == (8,) and np.isfinite(influence).all()
    assert (influence >= 0).all() and (influence <= 2).all()
    drop = rank_layers_for_drop(influence, 2)
    assert len(drop) == 2 and all(influence[d] <= np.sort(influence)[1] for d in drop)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffnskip_ext", *args], capture_output=True,
                          text=True, timeout=600)


def test_cli_calibrate_then_generate_with_the_policy(tiny_chat_model_dir, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nwhat is up\ntell me a story\n")
    out = tmp_path / "policy.json"
    done = run_cli("calibrate", "--model", str(tiny_chat_model_dir), "--target", "0.15",
                   "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "40",
                   "--warmup-tokens", "4", "--max-skips", "2")
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert written["kind"] == "ffn_skip" and written["max_skips_per_token"] == 2
    done = run_cli("generate", "hi", "--model", str(tiny_chat_model_dir), "--policy", str(out),
                   "--max-new-tokens", "30")
    assert done.returncode == 0, done.stderr
    assert "policy ffn_skip, FFN skip ratio" in done.stderr


def test_cli_rejects_a_bad_policy_file(tiny_chat_model_dir, tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "ffn_skip", "version": 1, "threshold": 3}')
    done = run_cli("generate", "hi", "--model", str(tiny_chat_model_dir), "--policy", str(bad))
    assert done.returncode == 2 and "threshold" in done.stderr and "Traceback" not in done.stderr
