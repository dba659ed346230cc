"""Speculative decoding: Decoder.verify and draft steps, rollback, greedy identity with plain
decoding (tiny models and SmolLM2), the sampling rule's distribution, bad input."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

import ffnskip_ext
from conftest import smollm2_path
from ffnskip_ext import (
    DensePolicy,
    EarlyExit,
    FFNSkipPolicy,
    FiRSTPolicy,
    LayerDrop,
    Routers,
    Speculative,
    SpeculativeStats,
    StaticFFNSkip,
    SubBlockSkip,
)
from ffnskip_ext.runtime.sampling import SamplingParams, probabilities
from ffnskip_ext.runtime.speculative import Acceptance, ngram_draft
from test_generate import ByteTokenizer

gguf = pytest.importorskip("gguf")
from gguf_files import write_gguf  # noqa: E402
from test_quantized_models import tiny_tensors  # noqa: E402

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
TOKENS = [7, 30, 8, 99, 41, 2, 2, 17, 63, 5, 11, 70, 12, 13, 90, 1, 44, 20, 6, 9] * 2


@pytest.fixture()
def path(tiny_model_dir):
    return tiny_model_dir("llama_gqa_untied_h72")[1]  # 3 layers, GQA, vocab 256


@pytest.fixture(scope="module")
def quantized_path(tmp_path_factory):
    config, tensors = tiny_tensors(["Q8_0", "Q4_K", "Q5_0", "Q6_K", "Q4_1"], True, seed=3)
    return write_gguf(tmp_path_factory.mktemp("spec") / "mixed.gguf", config, tensors)


def tiny(path, max_seq_len, dtype="float32"):
    """One thread: on a model this small the pool's hand-offs cost more than its work."""
    return ffnskip_ext.Decoder.from_pretrained(path, dtype=dtype, max_seq_len=max_seq_len,
                                               num_threads=1)


def steps(decoder, tokens):
    return np.stack([decoder.step(t) for t in tokens])


# ---------------------------------------------------------------------------- verify


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16"])
@pytest.mark.parametrize("model", ["float32", "quantized"])
@pytest.mark.parametrize("k", [1, 5, 16, 17, 40])
def test_verify_equals_successive_steps(path, quantized_path, model, k, kv_cache_dtype) -> None:
    """Bit for bit on the CPU (passes of up to 16 tokens compute each token as a step does,
    and longer verifies run as such passes), so the tolerance is zero for float32 and for
    GGUF blocks alike, with either cache; 17 and 40 run in chunks."""
    file, dtype = (path, "float32") if model == "float32" else (quantized_path, None)
    decoder = ffnskip_ext.Decoder.from_pretrained(file, dtype=dtype, max_seq_len=64,
                                                  kv_cache_dtype=kv_cache_dtype)
    vocab = decoder.config.vocab_size
    tokens = [t % vocab for t in TOKENS[:k]]
    decoder.prefill(PROMPT)
    want = steps(decoder, tokens)
    decoder.truncate(len(PROMPT))
    got = decoder.verify(tokens)
    assert got.shape == (k, vocab) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert decoder.position == len(PROMPT) + k


@pytest.mark.parametrize("policy", [StaticFFNSkip((1,)), LayerDrop((1,)),
                                    SubBlockSkip(attention=(1,), ffn=(2,)),
                                    FiRSTPolicy(Routers.constant(3, 72, [1.0, 0.0, 1.0]))])
def test_verify_follows_a_static_policy(path, policy) -> None:
    decoder = tiny(path, 64)
    decoder.set_policy(policy)
    decoder.prefill(PROMPT)
    want = steps(decoder, TOKENS[:6])
    decoder.truncate(len(PROMPT))
    np.testing.assert_array_equal(decoder.verify(TOKENS[:6]), want)


@pytest.mark.parametrize("policy", [FFNSkipPolicy(), EarlyExit(2)])
def test_verify_is_refused_where_steps_decide_per_token(path, policy) -> None:
    decoder = tiny(path, 64, dtype=None)
    decoder.set_policy(policy)
    decoder.prefill(PROMPT)
    assert not decoder.verifies
    with pytest.raises(ValueError, match="decides per token"):
        decoder.verify([1, 2])
    assert decoder.position == len(PROMPT)


def test_rollback_overwrites_drafted_and_rejected_kv(path) -> None:
    """Draft steps and a verify pass write K/V past the kept position; the next verify after
    truncate() overwrites them: its logits are those of a decoder that never saw them."""
    decoder = tiny(path, 64)
    decoder.set_draft_policy(LayerDrop((0, 1)))
    decoder.prefill(PROMPT)
    for t in TOKENS[:4]:
        decoder.draft_step(t)
    decoder.truncate(len(PROMPT))
    decoder.verify(TOKENS[4:9])
    decoder.truncate(len(PROMPT) + 2)  # keep two of the five
    got = decoder.verify([50, 51, 52])
    reference = tiny(path, 64)
    reference.prefill(PROMPT + TOKENS[4:6])
    np.testing.assert_array_equal(got, steps(reference, [50, 51, 52]))
    decoder.truncate(0)  # to 0: a new sequence
    np.testing.assert_array_equal(decoder.prefill([5, 6]), reference_prefill(path, [5, 6]))


def reference_prefill(path, tokens):
    return tiny(path, 64).prefill(
        tokens)


def test_a_first_draft_is_routed_by_the_dense_prefill_and_keeps_it_across_rollbacks(path):
    """A FiRST draft whose routers switch layer 1 off drafts exactly as LayerDrop((1,)) over
    the dense cache, while verify stays dense; truncate keeps the routing, a pass at 0
    routes again."""
    decoder = tiny(path, 64)
    decoder.set_draft_policy(FiRSTPolicy(Routers.constant(3, 72, [1.0, 0.0, 1.0])))
    decoder.prefill(PROMPT)
    assert decoder.stats().layer_active.tolist() == [True, False, True]
    layer_drop = tiny(path, 64)
    layer_drop.set_draft_policy(LayerDrop((1,)))
    layer_drop.prefill(PROMPT)
    for t in TOKENS[:3]:
        np.testing.assert_array_equal(decoder.draft_step(t), layer_drop.draft_step(t))
    decoder.truncate(len(PROMPT))
    assert decoder.stats().layer_active.tolist() == [True, False, True]
    dense = tiny(path, 64)
    dense.prefill(PROMPT)
    np.testing.assert_array_equal(decoder.verify(TOKENS[:4]), steps(dense, TOKENS[:4]))
    decoder.truncate(0)
    decoder.set_draft_policy(FiRSTPolicy(Routers.constant(3, 72, 1.0)))
    decoder.prefill(PROMPT)
    assert decoder.stats().layer_active.all()


def test_first_draft_and_first_policy_exclude_each_other(path) -> None:
    decoder = tiny(path, 64, dtype=None)
    first = FiRSTPolicy(Routers.constant(3, 72, 1.0))
    decoder.set_policy(first)
    with pytest.raises(ValueError, match="FiRST draft"):
        decoder.set_draft_policy(first)
    decoder.prefill(PROMPT)
    with pytest.raises(ValueError, match="FiRST"):
        decoder.draft_step(1)  # its routed-off layers would have no K/V
    assert decoder.position == len(PROMPT)
    decoder.reset()
    decoder.set_policy(DensePolicy())
    decoder.set_draft_policy(first)
    with pytest.raises(ValueError, match="FiRST draft"):
        decoder.set_policy(LayerDrop((1,)))
    with pytest.raises(ValueError, match="FiRST draft"):  # attention removed: no K/V to route on
        decoder.set_policy(SubBlockSkip(attention=(1,)))
    assert decoder.policy == DensePolicy()
    decoder.set_policy(SubBlockSkip(ffn=(1,)))  # a prefill still runs every layer
    decoder.set_draft_policy(DensePolicy())
    decoder.set_policy(SubBlockSkip(attention=(1,)))
    with pytest.raises(ValueError, match="FiRST draft"):
        decoder.set_draft_policy(first)
    assert decoder.draft_policy == DensePolicy()


@pytest.mark.parametrize("tokens, message", [([], "at least one"), (list(range(66)), "at most"),
                                             ([1, 999], "outside the vocabulary")])
def test_bad_verify_changes_nothing(path, tokens, message) -> None:
    decoder = tiny(path, 128)
    decoder.prefill(PROMPT)
    with pytest.raises(ValueError, match=message):
        decoder.verify(tokens)
    assert decoder.position == len(PROMPT)
    np.testing.assert_array_equal(decoder.step(7), steps_after(path, PROMPT, [7])[0])


def test_verify_past_max_seq_len_changes_nothing(path) -> None:
    decoder = tiny(path, 12)
    decoder.prefill(PROMPT)
    with pytest.raises(ValueError, match="context overflow"):
        decoder.verify([1, 2, 3, 4, 5])
    assert decoder.position == len(PROMPT)
    decoder.verify([1, 2, 3, 4])  # exactly fills the context
    with pytest.raises(ValueError):
        decoder.truncate(13)


def steps_after(path, prompt, tokens):
    decoder = tiny(path, 128)
    decoder.prefill(prompt)
    return steps(decoder, tokens)


# ------------------------------------------------------------------- greedy identity


def test_ngram_draft_takes_the_longest_latest_match() -> None:
    context = np.array([1, 2, 3, 9, 9, 1, 2, 4, 5, 7, 1, 2], dtype=np.int64)
    assert ngram_draft(context, 3, 2) == [4, 5]  # "1 2" last seen before 4 5
    assert ngram_draft(np.array([5, 6, 7, 8]), 3, 4) == []
    assert ngram_draft(np.array([4, 1, 2, 3, 1, 2]), 1, 8) == [3, 1, 2]  # n = 1: "2" -> 3 ...
    # ngram_min: shorter matches propose nothing
    one_token_match = np.array([4, 2, 3, 1, 2], dtype=np.int64)  # only "2" recurs
    assert ngram_draft(one_token_match, 3, 4) == [3, 1, 2]
    assert ngram_draft(one_token_match, 3, 4, ngram_min=2) == []
    assert ngram_draft(context, 3, 2, ngram_min=2) == [4, 5]


def generate_pair(decoder, tokenizer, prompt, spec, **kwargs):
    plain = ffnskip_ext.generate(decoder, tokenizer, prompt, **kwargs)
    plain_position = decoder.position
    fast = ffnskip_ext.generate(decoder, tokenizer, prompt, speculative=spec, **kwargs)
    assert fast.token_ids == plain.token_ids
    assert fast.text == plain.text
    assert fast.finish_reason == plain.finish_reason
    assert decoder.position == plain_position  # the cache ends as plain decoding leaves it
    assert plain.speculative is None and isinstance(fast.speculative, SpeculativeStats)
    return plain, fast


TINY_PROMPTS = ["abcabcabcabc", "hello hello hello", "the cat sat on the mat; the cat",
                "0101010101", "zq", "xyzzy xyzzy", "aaaaaaaaaaaa", "ab ab ab ba ba"]
DRAFT_POLICIES = [StaticFFNSkip((1,)), LayerDrop((1,)), EarlyExit(2),
                  SubBlockSkip(attention=(0,), ffn=(1, 2)),
                  FFNSkipPolicy(threshold=0.0, warmup_tokens=0, cold_start=0, cold_end=0,
                                full_token_interval=0),
                  FiRSTPolicy(Routers.constant(3, 72, [1.0, 0.0, 1.0]))]


@pytest.mark.parametrize("draft", ["ngram", "self", "auto"])
def test_greedy_identity_on_a_tiny_model_every_mode_and_draft_policy(path, draft) -> None:
    decoder = tiny(path, 96)
    tokenizer = ByteTokenizer()
    for i, prompt in enumerate(TINY_PROMPTS):
        policy = DRAFT_POLICIES[i % len(DRAFT_POLICIES)]
        spec = Speculative(draft=draft, draft_policy=policy, max_draft=1 + 3 * i % 12,
                           min_draft_prob=0.0)
        generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=40)


class EosAt(ByteTokenizer):
    def __init__(self, eos: int) -> None:
        self.eos_token_id = eos


def test_ends_inside_an_accepted_run_match_plain_decoding(path) -> None:
    """A dense draft is always accepted (its logits are the policy's), so every run is as
    long as max_draft allows and each end below falls inside one."""
    decoder = tiny(path, 96)
    tokenizer = ByteTokenizer()
    spec = Speculative(draft="self", draft_policy=DensePolicy(), max_draft=8, adaptive=False,
                       min_draft_prob=0.0)
    prompt = "abcabcabc"
    plain, fast = generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=30)
    assert fast.speculative.acceptance_rate == 1.0 and fast.speculative.drafted > 8
    ids = plain.token_ids
    # end of sequence: a token that first appears a few tokens into the output
    eos = next(t for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])
    _, fast = generate_pair(decoder, EosAt(eos), prompt, spec, max_new_tokens=30)
    assert fast.finish_reason == "eos" and len(fast.token_ids) == ids.index(eos)
    stop = plain.text[5:7]
    _, fast = generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=30, stop=[stop])
    assert fast.finish_reason == "stop"
    for max_new in (1, 2, 5, 7, 12):
        _, fast = generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=max_new)
        assert len(fast.token_ids) == max_new
    short = tiny(path, len(prompt) + 6)
    _, fast = generate_pair(short, tokenizer, prompt, spec, max_new_tokens=30)
    assert fast.finish_reason == "length" and len(fast.token_ids) == 7  # the context is full


def test_streaming_gets_every_accepted_token(path) -> None:
    decoder = tiny(path, 96)
    pieces: list[str] = []
    spec = Speculative(draft="self", draft_policy=DensePolicy(), min_draft_prob=0.0)
    result = ffnskip_ext.generate(decoder, ByteTokenizer(), "abcabc", max_new_tokens=20,
                                  speculative=spec, stream=pieces.append)
    assert "".join(pieces) == result.text
    assert len(pieces) > result.speculative.verify_passes  # token by token, not per round


def test_chat_session_reuses_the_cache_under_speculation(path) -> None:
    decoder = tiny(path, 96)
    session = ffnskip_ext.ChatSession(decoder, ByteTokenizer())
    first = session.generate("abcab", max_new_tokens=10, speculative="ngram")
    prompt = list(ByteTokenizer().encode("abcab")) + first.token_ids + [50, 51]
    second = session.generate(prompt, max_new_tokens=10, speculative="auto")
    assert second.cached_tokens > 5
    fresh = ffnskip_ext.ChatSession(
        tiny(path, 96),
        ByteTokenizer()).generate(prompt, max_new_tokens=10)
    assert second.token_ids == fresh.token_ids


SMOLLM2_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Repeat exactly: The quick brown fox jumps over the lazy dog "
                                 "while the cat sleeps."}],
    [{"role": "user", "content": "Fix the typo in this code: def add(a, b):\n    retrun a + b"}],
    [{"role": "user", "content": "Summarise: Water boils at 100 degrees Celsius at sea level. "
                                 "At higher altitudes water boils at lower temperatures."}],
]


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    return (ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=512),
            ffnskip_ext.load_tokenizer(path))


@pytest.mark.parametrize("draft", ["ngram", "self", "auto"])
def test_greedy_identity_on_smollm2(smollm2, draft) -> None:
    decoder, tokenizer = smollm2
    spec = Speculative(draft=draft, max_draft=6)
    drafted = 0
    for prompt in SMOLLM2_PROMPTS:
        _, fast = generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=20)
        drafted += fast.speculative.drafted
    assert drafted > 0


@pytest.fixture(scope="module")
def qwen_0_5b():
    from test_quantized_models import qwen_0_5b_path

    path = qwen_0_5b_path()
    return (ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=512),
            ffnskip_ext.load_tokenizer(path))


@pytest.mark.parametrize("spec", [
    Speculative(draft="ngram", max_draft=8), Speculative(draft="auto", max_draft=4),
    Speculative(draft="self", draft_policy=SubBlockSkip(attention=(5, 9), ffn=(3, 4, 10, 11)),
                max_draft=3, min_draft_prob=0.0),
], ids=["ngram", "auto", "self-sub-block"])
def test_greedy_identity_on_qwen_0_5b(qwen_0_5b, spec) -> None:
    """The mixed-type GGUF (Q5_0, Q8_0, Q4_K, Q6_K) through every verify tile width."""
    decoder, tokenizer = qwen_0_5b
    drafted = 0
    for prompt in SMOLLM2_PROMPTS:
        _, fast = generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=24)
        drafted += fast.speculative.drafted
    assert drafted > 0


def test_smollm2_ends_inside_accepted_runs(smollm2) -> None:
    decoder, tokenizer = smollm2
    spec = Speculative(draft="self", draft_policy=DensePolicy(), max_draft=8, adaptive=False,
                       min_draft_prob=0.0)
    prompt = [{"role": "user", "content": "Repeat exactly: The quick brown fox jumps over the "
                                          "lazy dog. Alice went to the market to buy bread."}]
    plain, fast = generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=40)
    assert plain.finish_reason == "eos" and fast.speculative.acceptance_rate == 1.0
    generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=5)
    generate_pair(decoder, tokenizer, prompt, spec, max_new_tokens=40, stop=[plain.text[4:9]])


# ------------------------------------------------------------------------------ sampling


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z = 3.09), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: dict[int, int], probs: dict[int, float], n: int) -> tuple[float, int]:
    """Statistic and degrees of freedom, bins of expectation < 5 pooled into one."""
    stat, pooled_obs, pooled_exp, bins = 0.0, 0, 0.0, 0
    for token, p in probs.items():
        expected, observed = n * p, counts.get(token, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat += (observed - expected) ** 2 / expected
        bins += 1
    outside = n - sum(counts.get(t, 0) for t in probs)
    pooled_obs += outside
    if pooled_exp > 0 or pooled_obs:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        bins += 1
    return stat, bins - 1


def accumulate(counts: dict[int, int], token: int) -> None:
    counts[token] = counts.get(token, 0) + 1


@pytest.mark.parametrize("point_mass", [True, False])
def test_acceptance_rule_samples_the_target(point_mass) -> None:
    """The rule on its own, over a 6-token vocabulary: draft tokens from q (or one fixed
    token, an n-gram's point mass), kept or replaced; the tokens must follow p, not q."""
    p_logits = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.15, 0.05]))
    q_logits = np.log(np.array([0.3, 0.1, 0.3, 0.05, 0.05, 0.2]))
    sampling = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(7)
    rule = Acceptance(sampling, None, rng)
    q = probabilities(q_logits, sampling)
    rows = np.stack([p_logits, p_logits]).astype(np.float32)
    counts: dict[int, int] = {}
    kept = 0
    n = 20000
    for _ in range(n):
        draft = 2 if point_mass else int(rng.choice(6, p=q))
        accepted, token = rule.accept(rows, [draft], None if point_mass else [q])
        kept += accepted
        accumulate(counts, draft if accepted else token)
    p = probabilities(p_logits, sampling)
    assert 0 < kept < n
    stat, df = chi_square(counts, dict(enumerate(p)), n)
    assert stat < chi_square_critical(df), (stat, df)
    wrong = dict(enumerate(q)) if not point_mass else {2: 1.0}
    stat_q, df_q = chi_square(counts, wrong, n)
    assert stat_q > chi_square_critical(max(df_q, 1))


def test_sampled_second_token_has_the_target_distribution(path) -> None:
    """End to end on a tiny model: the second token of a generation comes out of the rule
    (the first is sampled from the prefill's logits). Its exact distribution under plain
    sampling is sum_t1 p(t1) p(t2 | t1), computed from steps; 3000 seeded speculative
    generations with a self draft must pass a chi-square test at 0.001 against it, and fail
    one against the draft's own marginal."""
    sampling = SamplingParams(temperature=1.5, top_k=5)
    draft_policy = LayerDrop((0, 1))
    decoder = tiny(path, 64)
    prompt = [66, 67, 68, 66, 67, 68, 66, 67]
    first = probabilities(decoder.prefill(prompt), sampling)
    target: dict[int, float] = {}
    draft_marginal: dict[int, float] = {}
    drafter = tiny(path, 64)
    drafter.set_draft_policy(draft_policy)
    drafter.prefill(prompt)
    for t1 in np.flatnonzero(first):
        decoder.truncate(len(prompt))
        second = probabilities(decoder.step(int(t1)), sampling)
        drafter.truncate(len(prompt))
        q = probabilities(drafter.draft_step(int(t1)), sampling)
        for t2 in np.flatnonzero(second):
            target[int(t2)] = target.get(int(t2), 0.0) + first[t1] * second[t2]
        for t2 in np.flatnonzero(q):
            draft_marginal[int(t2)] = draft_marginal.get(int(t2), 0.0) + first[t1] * q[t2]
    spec = Speculative(draft="self", draft_policy=draft_policy, max_draft=2, min_draft_prob=0.0)
    counts: dict[int, int] = {}
    accepted = drafted = 0
    n = 3000
    text = ByteTokenizer().decode(prompt)
    for seed in range(n):
        result = ffnskip_ext.generate(decoder, ByteTokenizer(), text, max_new_tokens=2,
                                      temperature=sampling.temperature, top_k=sampling.top_k,
                                      seed=seed, speculative=spec)
        accumulate(counts, result.token_ids[1])
        accepted += result.speculative.accepted
        drafted += result.speculative.drafted
    assert 0 < accepted < drafted  # both branches of the rule ran
    stat, df = chi_square(counts, target, n)
    assert stat < chi_square_critical(df), (stat, df)
    stat_q, df_q = chi_square(counts, draft_marginal, n)
    assert stat_q > chi_square_critical(df_q), "the test cannot tell the draft from the target"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_draft=0), "max_draft"), (dict(max_draft=65), "max_draft"),
    (dict(max_draft=2.5), "max_draft"), (dict(draft="beam"), "unknown speculative draft"),
    (dict(min_draft_prob=1.0), "min_draft_prob"), (dict(draft_policy="dense"), "Policy"),
    (dict(ngram_min=4), "ngram_min"), (dict(ngram_min=0), "ngram_min"),
])
def test_bad_speculative_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Speculative(**kwargs)


@pytest.mark.parametrize("speculative, message", [
    ("beam", "unknown speculative draft"), (3, "speculative must be"),
    (Speculative(draft="self", draft_policy=StaticFFNSkip((7,))), "layer"),
])
def test_bad_speculation_leaves_the_decoder_unchanged(path, speculative, message) -> None:
    decoder = tiny(path, 64)
    decoder.prefill(PROMPT)
    with pytest.raises(ValueError, match=message):
        ffnskip_ext.generate(decoder, ByteTokenizer(), "abc", speculative=speculative)
    assert decoder.position == len(PROMPT) and decoder.draft_policy == DensePolicy()
    np.testing.assert_array_equal(decoder.step(7), steps_after(path, PROMPT, [7])[0])


def test_repeat_penalty_with_speculation_is_refused_before_any_work(path) -> None:
    decoder = tiny(path, 64)
    decoder.prefill(PROMPT)
    with pytest.raises(ValueError, match="repeat_penalty"):
        ffnskip_ext.generate(decoder, ByteTokenizer(), "abc", speculative="ngram",
                             repeat_penalty=1.3)
    assert decoder.position == len(PROMPT) and decoder.draft_policy == DensePolicy()
    np.testing.assert_array_equal(decoder.step(7), steps_after(path, PROMPT, [7])[0])


def test_speculation_needs_a_policy_that_verifies(path) -> None:
    decoder = tiny(path, 64, dtype=None)
    decoder.set_policy(FFNSkipPolicy())
    decoder.prefill(PROMPT)
    with pytest.raises(ValueError, match="decide nothing per token"):
        ffnskip_ext.generate(decoder, ByteTokenizer(), "abc", speculative="ngram")
    assert decoder.position == len(PROMPT)


def test_speculative_is_frozen_and_comparable() -> None:
    spec = Speculative(draft="ngram", max_draft=4)
    assert dataclasses.replace(spec, max_draft=4) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_draft = 5  # type: ignore[misc]


def test_cli_generate_speculative_prints_acceptance() -> None:
    smollm2_path()
    done = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "generate", "Repeat: one two three one two three",
         "--max-new-tokens", "12", "--speculative", "ngram", "--draft-max", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "accepted" in done.stderr and "tokens/s" in done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "ffnskip_ext", "generate", "hi", "--speculative", "self",
         "--draft-max", "65"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "max_draft" in bad.stderr
