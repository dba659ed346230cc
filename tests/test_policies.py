"""Skip policies in the engine against transformers: the adaptive rule re-implemented with
hooks on an HF model, and every baseline doing exactly what it says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ffnskip_ext
from conftest import hf_logits, smollm2_path
from ffnskip_ext import (
    DensePolicy,
    EarlyExit,
    FFNSkipPolicy,
    LayerDrop,
    RandomFFNSkip,
    StaticFFNSkip,
    SubBlockSkip,
    load_policy,
)
from skip_reference import ReferenceRule


def hf_ffn_skip_decode(model, prompt: list[int], feed: list[int], rule: ReferenceRule):
    """Teacher-forced decode of `feed` after `prompt` with transformers, skipping FFNs by the
    reference rule through hooks: the FFN (mlp) output is zeroed when skipped, so the residual
    after the block is a_l exactly. Returns decisions, scores and logits per step."""
    layers = model.model.layers
    residual: dict[int, torch.Tensor] = {}
    state = {"decode": False, "skips": [], "scores": []}

    def before_ffn(idx):
        def hook(module, args):
            residual[idx] = args[0]
        return hook

    def ffn(idx):
        def hook(module, args, output):
            if not state["decode"]:
                return output
            if rule.skip(idx):
                state["skips"][-1][idx] = True
                return torch.zeros_like(output)
            a = residual[idx][0, -1].double()
            b = a + output[0, -1].double()
            score = float(torch.dot(a, b) / torch.sqrt(torch.dot(a, a) * torch.dot(b, b)))
            rule.record(score)
            state["scores"][-1][idx] = rule.prev_score
            return output
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(before_ffn(i)))
        handles.append(layer.mlp.register_forward_hook(ffn(i)))
    logits = []
    try:
        with torch.inference_mode():
            out = model(torch.tensor([prompt]), use_cache=True)
            state["decode"] = True
            for token in feed:
                state["skips"].append([False] * len(layers))
                state["scores"].append([float("nan")] * len(layers))
                rule.begin_token()
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values,
                            use_cache=True)
                rule.end_token()
                logits.append(out.logits[0, -1].float().numpy())
    finally:
        for h in handles:
            h.remove()
    return np.array(state["skips"]), np.array(state["scores"]), np.array(logits)


def engine_decode(decoder, prompt: list[int], feed: list[int]):
    decoder.reset()
    decoder.clear_trace()
    decoder.enable_trace(True)
    decoder.prefill(prompt)
    logits = np.array([decoder.step(t) for t in feed])
    return decoder.trace(), logits


def assert_same_decisions(ours, ref, scores, threshold: float) -> None:
    """Identical except where the deciding score lies within 1e-4 of the threshold; after
    such a place the two runs may legitimately diverge, so comparison stops at its token."""
    for t in range(len(ref)):
        if not np.array_equal(ours[t], ref[t]):
            near = np.nanmin(np.abs(scores[t] - threshold))
            assert near < 1e-4, f"token {t}: {ours[t].astype(int)} vs ref {ref[t].astype(int)}"
            return


@pytest.mark.parametrize("variant", ["llama_gqa_untied_h72", "qwen2_qkv_bias"])
def test_adaptive_trace_equals_transformers_reimplementation(tiny_model_dir, variant) -> None:
    model, path = tiny_model_dir(variant)
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=96)
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 256, size=9).tolist()
    feed = rng.integers(0, 256, size=40).tolist()
    # The tiny models' scores sit around 0.6-0.95: choose a threshold among them.
    dense_trace, _ = engine_decode(decoder, prompt, feed)
    threshold = float(np.nanmedian(dense_trace["score"]))
    policy = FFNSkipPolicy(threshold=threshold, warmup_tokens=5, cold_start=0, cold_end=0,
                           max_skips_per_token=2, full_token_interval=4)
    decoder.set_policy(policy)
    trace, logits = engine_decode(decoder, prompt, feed)
    rule = ReferenceRule(model.config.num_hidden_layers, threshold, 5, 4, 2, 0, 0)
    ref_skips, ref_scores, ref_logits = hf_ffn_skip_decode(model, prompt, feed, rule)
    assert ref_skips.any() and (~ref_skips).any(), "the test should exercise both outcomes"
    assert_same_decisions(trace["ffn_skipped"], ref_skips, ref_scores, threshold)
    if np.array_equal(trace["ffn_skipped"], ref_skips):
        np.testing.assert_allclose(trace["score"], ref_scores, atol=1e-5)
        span = float(np.ptp(ref_logits))
        assert np.abs(logits - ref_logits).max() <= 1e-3 * span


def test_adaptive_trace_on_smollm2_equals_transformers_reimplementation() -> None:
    path = smollm2_path()
    import os

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=128)
    tokenizer = ffnskip_ext.load_tokenizer(path)
    prompt = ffnskip_ext.encode_prompt(
        tokenizer, [{"role": "user", "content": "Describe a walk through a forest."}]
    )
    dense = ffnskip_ext.generate(decoder, tokenizer, [{"role": "user", "content":
                                 "Describe a walk through a forest."}], max_new_tokens=40)
    feed = dense.token_ids
    policy = FFNSkipPolicy(threshold=0.96, warmup_tokens=4, max_skips_per_token=4)
    decoder.set_policy(policy)
    trace, logits = engine_decode(decoder, prompt, feed)
    args = policy.engine_args(30)
    rule = ReferenceRule(30, 0.96, 4, 6, 4, args["cold_start"], args["cold_end"])
    ref_skips, ref_scores, ref_logits = hf_ffn_skip_decode(model, prompt, feed, rule)
    assert ref_skips.any()
    assert_same_decisions(trace["ffn_skipped"], ref_skips, ref_scores, 0.96)
    agree = (trace["ffn_skipped"] == ref_skips).mean()
    assert agree > 0.95, f"decisions agree on {agree:.1%}"


@pytest.fixture()
def tiny(tiny_model_dir):
    model, path = tiny_model_dir("llama_gqa_untied_h72")
    return model, ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)


PROMPT = [5, 17, 99, 3, 42, 7]
FEED = [11, 12, 13, 14, 15, 16, 17, 18]


def test_dense_and_never_skipping_policies_equal_no_policy(tiny) -> None:
    _, decoder = tiny
    _, base = engine_decode(decoder, PROMPT, FEED)
    for policy in (DensePolicy(), FFNSkipPolicy(threshold=1.0, warmup_tokens=0),
                   StaticFFNSkip(()), RandomFFNSkip(k=0)):
        decoder.set_policy(policy)
        trace, logits = engine_decode(decoder, PROMPT, FEED)
        assert not trace["ffn_skipped"].any()
        np.testing.assert_array_equal(logits, base)


def test_static_ffn_skip_skips_exactly_its_layers(tiny) -> None:
    _, decoder = tiny
    decoder.set_policy(StaticFFNSkip([1]))
    trace, _ = engine_decode(decoder, PROMPT, FEED)
    expected = np.zeros((len(FEED), 3), bool)
    expected[:, 1] = True
    np.testing.assert_array_equal(trace["ffn_skipped"], expected)
    assert not trace["layer_skipped"].any()
    stats = decoder.stats()
    assert stats.ffn_skipped[1] >= len(FEED) and stats.skip_ratio > 0


def test_random_ffn_skip_is_k_per_token_seeded_and_varies(tiny) -> None:
    _, decoder = tiny
    decoder.set_policy(RandomFFNSkip(k=1, seed=5, cold_start=0, cold_end=1))
    first, _ = engine_decode(decoder, PROMPT, FEED)
    again, _ = engine_decode(decoder, PROMPT, FEED)
    skipped = first["ffn_skipped"]
    assert (skipped.sum(axis=1) == 1).all()
    assert not skipped[:, 2].any()  # cold end
    assert len({tuple(r) for r in skipped.astype(int)}) > 1
    np.testing.assert_array_equal(skipped, again["ffn_skipped"])
    decoder.set_policy(RandomFFNSkip(k=1, seed=6, cold_start=0, cold_end=1))
    other, _ = engine_decode(decoder, PROMPT, FEED)
    assert not np.array_equal(other["ffn_skipped"], skipped)


def test_layer_drop_equals_transformers_without_those_layers(tiny) -> None:
    model, decoder = tiny
    decoder.set_policy(LayerDrop([1]))
    trace, logits = engine_decode(decoder, PROMPT, FEED)
    assert trace["layer_skipped"][:, 1].all() and trace["ffn_skipped"][:, 1].all()
    kept = torch.nn.ModuleList([model.model.layers[0], model.model.layers[2]])
    original = model.model.layers
    model.model.layers = kept
    try:
        ref = hf_logits(model, PROMPT + FEED)
    finally:
        model.model.layers = original
    for i in range(len(FEED)):
        span = float(np.ptp(ref[len(PROMPT) + i]))
        assert np.abs(logits[i] - ref[len(PROMPT) + i]).max() <= 1e-3 * span


class _Zero(torch.nn.Module):
    """A sub-block that adds nothing to the residual stream (attention returns a pair)."""

    def __init__(self, pair: bool) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, hidden_states, *args, **kwargs):
        zero = torch.zeros_like(hidden_states)
        return (zero, None) if self.pair else zero


def test_sub_block_skip_equals_transformers_without_those_sub_blocks(tiny) -> None:
    model, decoder = tiny
    decoder.set_policy(SubBlockSkip(attention=[1], ffn=[2]))
    trace, logits = engine_decode(decoder, PROMPT, FEED)
    assert trace["layer_skipped"][:, 1].all() and not trace["layer_skipped"][:, [0, 2]].any()
    assert trace["ffn_skipped"][:, 2].all() and not trace["ffn_skipped"][:, [0, 1]].any()
    # The last layer's FFN in the prompt affects no decode token: zero it for every token.
    layers = model.model.layers
    attention, mlp = layers[1].self_attn, layers[2].mlp
    layers[1].self_attn, layers[2].mlp = _Zero(pair=True), _Zero(pair=False)
    try:
        ref = hf_logits(model, PROMPT + FEED)
    finally:
        layers[1].self_attn, layers[2].mlp = attention, mlp
    for i in range(len(FEED)):
        span = float(np.ptp(ref[len(PROMPT) + i]))
        assert np.abs(logits[i] - ref[len(PROMPT) + i]).max() <= 1e-3 * span


@pytest.mark.parametrize("removing", [SubBlockSkip(attention=[1]), LayerDrop([1])])
def test_a_policy_that_runs_removed_attention_again_needs_a_new_sequence(tiny,
                                                                         removing) -> None:
    _, decoder = tiny
    decoder.set_policy(removing)
    engine_decode(decoder, PROMPT, FEED[:2])
    decoder.set_policy(DensePolicy())
    with pytest.raises(ValueError, match="no K/V of layer 1"):
        decoder.step(FEED[2])
    assert decoder.position == len(PROMPT) + 2  # refused before any work
    decoder.set_policy(SubBlockSkip(attention=[1], ffn=[0]))  # still removes it: fine
    assert np.isfinite(decoder.step(FEED[2])).all()
    decoder.set_policy(DensePolicy())
    decoder.reset()
    _, dense = engine_decode(decoder, PROMPT, FEED[:2])
    assert np.isfinite(dense).all()


def test_early_exit_uses_the_exit_state_and_writes_kv(tiny) -> None:
    model, decoder = tiny
    decoder.set_policy(EarlyExit(exit_layer=2))
    trace, logits = engine_decode(decoder, PROMPT, FEED[:1])
    assert trace["layer_skipped"][0].tolist() == [False, False, True]
    assert trace["ffn_skipped"][0].tolist() == [False, False, True]
    with torch.inference_mode():
        out = model(torch.tensor([PROMPT + FEED[:1]]), output_hidden_states=True)
        exit_state = out.hidden_states[2][0, -1]
        ref = model.lm_head(model.model.norm(exit_state)).float().numpy()
    assert np.abs(logits[0] - ref).max() <= 1e-3 * float(np.ptp(ref))
    # The exited token's K/V of layer 2 were written: a later dense step sees a full cache.
    decoder.set_policy(DensePolicy())
    step = decoder.step(FEED[1])
    assert np.isfinite(step).all()


def test_policies_round_trip_through_json(tmp_path) -> None:
    for policy in (DensePolicy(), FFNSkipPolicy(threshold=0.9, max_skips_per_token=3),
                   StaticFFNSkip([4, 2]), RandomFFNSkip(k=2, seed=9), LayerDrop([1, 3]),
                   EarlyExit(exit_layer=5), SubBlockSkip(attention=[3, 1], ffn=[2])):
        assert load_policy(policy.to_json()) == policy
        file = tmp_path / f"{policy.kind}.json"
        file.write_text(policy.to_json())
        assert load_policy(file) == policy
    assert load_policy("dense") == DensePolicy()
    assert load_policy("ffn-skip") == FFNSkipPolicy(max_skips_per_token=4)


@pytest.mark.parametrize(
    "make, field",
    [
        # The engine's messages print the value as given (shortest float text, no locale).
        (lambda: FFNSkipPolicy(threshold=1.01), r"threshold must be in \[-1, 1\], got 1\.01$"),
        (lambda: FFNSkipPolicy(threshold=float("nan")), "threshold .*, got nan$"),
        (lambda: FFNSkipPolicy(warmup_tokens=-1), "warmup_tokens must be >= 0, got -1$"),
        (lambda: FFNSkipPolicy(max_skips_per_token=-2), "max_skips_per_token"),
        (lambda: FFNSkipPolicy(cold_start=-1), "cold_start"),
        (lambda: RandomFFNSkip(k=-1), "k must be >= 0, got -1$"),
        (lambda: StaticFFNSkip([1, 1]), "duplicates"),
        (lambda: LayerDrop([-1]), "layers"),
        (lambda: SubBlockSkip(attention=[2, 2]), "attention_layers has duplicates"),
        (lambda: SubBlockSkip(ffn=[-1]), "layers"),
        (lambda: EarlyExit(exit_layer=0), "exit_layer"),
        (lambda: load_policy('{"kind": "magic", "version": 1}'), "kind"),
        (lambda: load_policy('{"kind": "dense", "version": 7}'), "version"),
        (lambda: load_policy('{"kind": "dense", "version": 1, "speed": 2}'), "speed"),
        (lambda: load_policy("{not json"), "JSON"),
    ],
)
def test_invalid_policy_values(make, field) -> None:
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize(
    "policy, field",
    [
        (FFNSkipPolicy(cold_start=2, cold_end=1), "cold_start \\+ cold_end"),
        (StaticFFNSkip([3]), "layers"),
        (LayerDrop([0, 1, 2]), "every layer"),
        (EarlyExit(exit_layer=4), "exit_layer"),
        (SubBlockSkip(attention=[3]), "attention_layers"),
        (RandomFFNSkip(k=1, cold_start=3, cold_end=0), "cold_start"),
    ],
)
def test_policies_invalid_for_the_model_keep_the_previous_one(tiny, policy, field) -> None:
    _, decoder = tiny
    good = StaticFFNSkip([0])
    decoder.set_policy(good)
    with pytest.raises(ValueError, match=field):
        decoder.set_policy(policy)
    assert decoder.policy == good
    trace, _ = engine_decode(decoder, PROMPT, FEED[:2])
    assert trace["ffn_skipped"][:, 0].all()


def test_policy_file_is_json_with_kind_and_version(tmp_path) -> None:
    data = json.loads(FFNSkipPolicy().to_json())
    assert data["kind"] == "ffn_skip" and data["version"] == 1 and data["threshold"] == 0.95
