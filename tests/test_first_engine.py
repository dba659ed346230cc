"""FiRST in the engine: routers decide at the first pass of a sequence which layers run, and
the engine's decisions, gates and logits equal a PyTorch re-implementation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from ffnskip_ext import (
    Decoder,
    DensePolicy,
    FFNSkipPolicy,
    FiRSTPolicy,
    LayerDrop,
    Routers,
    load_policy,
)
from ffnskip_ext.training.first import reference_decisions

LAYERS, HIDDEN = 6, 64
PROMPT = [1, 5, 9, 33, 70, 101, 7, 250]
FEED = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.15, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: randomise them so the router input depends on them
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def decoder(model, policy=None) -> Decoder:
    d = Decoder.from_hf_model(model, max_seq_len=64)
    if policy is not None:
        d.set_policy(policy)
    return d


def run(d: Decoder, prompt=PROMPT, feed=FEED) -> list[np.ndarray]:
    return [d.prefill(prompt)] + [d.step(t) for t in feed]


def random_routers(seed: int, scale: float = 3.0) -> Routers:
    """Routers whose logits depend on the prompt and spread well around 0."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, scale, (LAYERS, HIDDEN)).astype(np.float32)
    bias = rng.normal(0.0, 1.0, LAYERS).astype(np.float32)
    return Routers(weight, bias)


@pytest.mark.parametrize("gates", [
    [0.9, 0.2, 0.6, 0.4, 0.5, 0.8],
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    [1.0, 1.0, 0.49, 0.51, 0.0, 1.0],
])
def test_fixed_routers_give_exactly_the_expected_layers(model, gates):
    threshold = 0.5
    expected_off = [i for i, g in enumerate(gates) if g < threshold]
    d = decoder(model, FiRSTPolicy(Routers.constant(LAYERS, HIDDEN, gates), threshold))
    d.enable_trace()
    outs = run(d)
    stats = d.stats()
    np.testing.assert_array_equal(~stats.layer_active, np.isin(range(LAYERS), expected_off))
    np.testing.assert_allclose(stats.router_gate, gates, atol=1e-6)
    trace = d.trace()
    assert trace["layer_skipped"].shape == (len(FEED), LAYERS)
    for key in ("layer_skipped", "ffn_skipped"):
        np.testing.assert_array_equal(trace[key], np.broadcast_to(~stats.layer_active,
                                                                  trace[key].shape))
    assert np.isnan(trace["layer_score"][:, expected_off]).all()
    np.testing.assert_array_equal(stats.layer_skipped,
                                  np.isin(range(LAYERS), expected_off) * len(FEED))
    # The same layers removed by layer drop (prompt included) compute the same thing, bit for bit
    if len(expected_off) < LAYERS:
        reference = run(decoder(model, LayerDrop(layers=expected_off)))
        for a, b in zip(outs, reference, strict=True):
            np.testing.assert_array_equal(a, b)


def test_skipped_layers_hold_no_kv_cache(model):
    d = decoder(model, FiRSTPolicy(Routers.constant(LAYERS, HIDDEN, [1, 0, 1, 0, 0, 1])))
    full = d.stats().kv_cache_bytes
    per_layer = 2 * 64 * (HIDDEN // 4 * 2) * 4  # K and V, max_seq_len 64, kv_dim 32, fp32
    assert full == LAYERS * per_layer
    run(d)
    assert d.stats().kv_cache_bytes == 3 * per_layer
    d.reset()
    d.set_policy(DensePolicy())
    assert d.stats().kv_cache_bytes == full
    assert d.stats().layer_active.all()


def test_threshold_zero_runs_every_layer_like_dense(model):
    routers = random_routers(1)
    first = run(decoder(model, FiRSTPolicy(routers, threshold=0.0)))
    dense = run(decoder(model))
    for a, b in zip(first, dense, strict=True):
        np.testing.assert_array_equal(a, b)


def test_engine_decisions_equal_pytorch(model):
    kept = []
    for seed in range(4):
        routers = random_routers(seed)
        prompt = list(np.random.default_rng(seed).integers(0, 256, 5 + 3 * seed))
        keep, gates, logits = reference_decisions(model, routers, prompt, 0.5)
        d = decoder(model, FiRSTPolicy(routers, 0.5))
        engine_logits = d.prefill(prompt)
        stats = d.stats()
        np.testing.assert_array_equal(stats.layer_active, keep)
        np.testing.assert_allclose(stats.router_gate, gates, atol=1e-5)
        span = float(logits.max() - logits.min())
        np.testing.assert_allclose(engine_logits, logits, atol=1e-3 * span, rtol=0)
        kept += keep.tolist()
    assert 0 < sum(kept) < len(kept), "the cases should keep some layers and skip others"


def test_routing_follows_the_prompt_and_holds_for_the_sequence(model):
    routers = random_routers(0)
    d = decoder(model, FiRSTPolicy(routers))
    decisions = set()
    for start in range(0, 200, 20):
        prompt = list(range(start, start + 6))
        d.reset()
        d.prefill(prompt)
        active = d.stats().layer_active.copy()
        decisions.add(tuple(active))
        d.prefill([7, 8])  # a later pass of the same sequence keeps the routing
        d.step(9)
        np.testing.assert_array_equal(d.stats().layer_active, active)
        assert tuple(reference_decisions(model, routers, prompt)[0]) == tuple(active)
    assert len(decisions) > 1, "routers with random weights should route prompts differently"


def test_sequence_starting_with_a_step_is_routed(model):
    routers = random_routers(2)
    d = decoder(model, FiRSTPolicy(routers))
    logits = d.step(42)
    keep, _, reference = reference_decisions(model, routers, [42])
    np.testing.assert_array_equal(d.stats().layer_active, keep)
    np.testing.assert_allclose(logits, reference, atol=1e-3 * float(np.ptp(reference)))


def test_policy_changes_mid_sequence(model):
    routers = Routers.constant(LAYERS, HIDDEN, [1, 0, 1, 1, 0, 1])
    d = decoder(model)
    dense = run(decoder(model))
    d.prefill(PROMPT)
    d.set_policy(FiRSTPolicy(routers))  # routes from the next sequence: this one stays dense
    np.testing.assert_array_equal(d.step(FEED[0]), dense[1])
    assert d.stats().layer_active.all()
    d.reset()
    d.prefill(PROMPT)
    assert d.stats().layer_active.tolist() == [1, 0, 1, 1, 0, 1]
    for policy in (DensePolicy(), FFNSkipPolicy()):  # the skipped layers have no K/V
        with pytest.raises(ValueError, match="reset"):
            d.set_policy(policy)
    assert isinstance(d.policy, FiRSTPolicy)
    d.set_policy(FiRSTPolicy(Routers.constant(LAYERS, HIDDEN, 1.0)))  # from the next sequence
    d.enable_trace()  # tracing does not re-route the sequence either
    d.step(3)
    assert d.trace()["layer_skipped"][0].tolist() == [0, 1, 0, 0, 1, 0]
    fresh = decoder(model, FiRSTPolicy(routers))  # still usable: as an untouched decoder
    fresh.prefill(PROMPT)
    fresh.step(3)
    np.testing.assert_array_equal(d.step(4), fresh.step(4))
    d.reset()
    d.set_policy(DensePolicy())
    np.testing.assert_array_equal(d.prefill(PROMPT), dense[0])


def test_bad_routers_and_thresholds_raise(model, tmp_path):
    d = decoder(model)
    with pytest.raises(ValueError, match="threshold"):
        FiRSTPolicy(Routers.constant(LAYERS, HIDDEN, 0.5), threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        FiRSTPolicy(Routers.constant(LAYERS, HIDDEN, 0.5), threshold=float("nan"))
    with pytest.raises(ValueError, match="layers"):
        d.set_policy(FiRSTPolicy(Routers.constant(LAYERS + 1, HIDDEN, 0.5)))
    with pytest.raises(ValueError, match="routers"):
        d.set_policy(FiRSTPolicy(Routers.constant(LAYERS, HIDDEN + 8, 0.5)))
    with pytest.raises(FileNotFoundError):
        FiRSTPolicy(tmp_path / "missing.safetensors")
    assert isinstance(d.policy, DensePolicy)
    np.testing.assert_array_equal(d.prefill(PROMPT), decoder(model).prefill(PROMPT))


def test_policy_file_names_the_router_file(model, tmp_path):
    routers = random_routers(3)
    path = routers.save(tmp_path / "routers.safetensors")
    policy = FiRSTPolicy(path, threshold=0.4)
    text = policy.to_json()
    assert json.loads(text)["routers"] == str(path)
    again = load_policy(text)
    assert isinstance(again, FiRSTPolicy) and again.threshold == 0.4
    assert again.routers == routers
    a = run(decoder(model, policy))
    b = run(decoder(model, again))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="save"):
        FiRSTPolicy(random_routers(4)).to_json()
