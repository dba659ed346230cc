"""ChatSession: a prompt that continues the last sequence prefills only what is new, and
gives what a fresh decoder gives; policy changes, cancellation and direct decoder calls."""

from __future__ import annotations

import pytest

import ffnskip_ext
from ffnskip_ext import FFNSkipPolicy
from ffnskip_ext.runtime.session import ChatSession

GREEDY = dict(max_new_tokens=12, temperature=0.0)
# Skips in every decode step, so that reused K/V of decoded tokens would show.
SKIPPING = FFNSkipPolicy(threshold=-1.0, warmup_tokens=0, cold_start=1, cold_end=1,
                         full_token_interval=0)


@pytest.fixture(scope="module")
def model(tiny_chat_model_dir):
    return tiny_chat_model_dir, ffnskip_ext.load_tokenizer(tiny_chat_model_dir)


def session(model, policy=None) -> ChatSession:
    path, tokenizer = model
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=256, num_threads=1)
    if policy is not None:
        decoder.set_policy(policy)
    return ChatSession(decoder, tokenizer)


def fresh(model, prompt, policy=None, **kwargs):
    return session(model, policy).generate(prompt, **{**GREEDY, **kwargs})


def test_a_fresh_session_generates_as_generate(model) -> None:
    path, tokenizer = model
    messages = [{"role": "user", "content": "Tell me a story."}]
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=256, num_threads=1)
    want = ffnskip_ext.generate(decoder, tokenizer, messages, **GREEDY)
    got = session(model).generate(messages, **GREEDY)
    assert (got.text, got.token_ids, got.cached_tokens) == (want.text, want.token_ids, 0)


def test_the_next_turn_reuses_prompt_and_answer(model) -> None:
    s = session(model)
    prompt = s.tokenizer.encode("Once upon a time")
    first = s.generate(prompt, **GREEDY)
    assert first.finish_reason == "length"  # so every sampled token but the last was fed
    follow = prompt + first.token_ids + s.tokenizer.encode(" and then")
    second = s.generate(follow, **GREEDY)
    assert second.cached_tokens == len(prompt) + len(first.token_ids) - 1
    want = fresh(model, follow)
    assert (second.text, second.token_ids) == (want.text, want.token_ids)


def test_an_equal_prompt_feeds_its_last_token_again(model) -> None:
    s = session(model)
    prompt = s.tokenizer.encode("The same prompt twice")
    first = s.generate(prompt, **GREEDY)
    again = s.generate(prompt, **GREEDY)
    assert again.cached_tokens == len(prompt) - 1
    assert again.token_ids == first.token_ids


def test_a_diverging_prompt_reuses_the_common_prefix(model) -> None:
    s = session(model)
    s.generate(s.tokenizer.encode("abcdefgh"), **GREEDY)
    other = s.tokenizer.encode("abcdXYZ")
    result = s.generate(other, **GREEDY)
    assert result.cached_tokens == 4
    assert result.token_ids == fresh(model, other).token_ids


def test_a_skipping_policy_reuses_the_prompt_only(model) -> None:
    s = session(model, SKIPPING)
    prompt = s.tokenizer.encode("Skipping FFN blocks")
    first = s.generate(prompt, **GREEDY)
    assert s.decoder.stats().ffn_skipped.sum() > 0
    follow = prompt + first.token_ids + s.tokenizer.encode(" next")
    second = s.generate(follow, **GREEDY)
    assert second.cached_tokens == len(prompt)  # decoded tokens' K/V were computed skipping
    want = fresh(model, follow, SKIPPING)
    assert (second.text, second.token_ids) == (want.text, want.token_ids)


def test_a_policy_change_starts_from_an_empty_cache(model) -> None:
    s = session(model)
    prompt = s.tokenizer.encode("Policy change")
    s.generate(prompt, **GREEDY)
    s.set_policy(SKIPPING)
    changed = s.generate(prompt, **GREEDY)
    assert changed.cached_tokens == 0
    assert changed.token_ids == fresh(model, prompt, SKIPPING).token_ids
    s.set_policy(SKIPPING)  # the same policy again: the cache stays
    assert s.generate(prompt, **GREEDY).cached_tokens == len(prompt) - 1
    s.decoder.set_policy(ffnskip_ext.DensePolicy())  # behind the session's back
    assert s.generate(prompt, **GREEDY).cached_tokens == 0


def test_cancellation_stops_at_the_next_token_and_the_cache_stays_usable(model) -> None:
    s = session(model)
    prompt = s.tokenizer.encode("Cancel me")
    asked = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) >= 3

    result = s.generate(prompt, max_new_tokens=50, cancelled=cancelled)
    assert result.finish_reason == "cancelled"
    assert len(result.token_ids) == 3
    follow = prompt + result.token_ids
    again = s.generate(follow, **GREEDY)
    assert again.cached_tokens == len(prompt) + 2
    assert again.token_ids == fresh(model, follow).token_ids


def test_direct_decoder_calls_and_errors_invalidate_the_cache(model) -> None:
    s = session(model)
    prompt = s.tokenizer.encode("Direct calls")
    s.generate(prompt, **GREEDY)
    s.decoder.reset()  # noticed through the position only: it must differ
    s.decoder.prefill(s.tokenizer.encode("something else"))
    result = s.generate(prompt, **GREEDY)
    assert result.cached_tokens == 0
    assert result.token_ids == fresh(model, prompt).token_ids
    with pytest.raises(ValueError, match="max_seq_len"):
        s.generate([5] * 256, **GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.generate(prompt[:3] + [10**6], **GREEDY)  # refused by the prefill, after the cut
    assert s.reusable_tokens(prompt) == 0
    assert s.generate(prompt, **GREEDY).token_ids == result.token_ids


def test_logit_bias_steers_sampling(model) -> None:
    s = session(model)
    prompt = s.tokenizer.encode("Bias")
    no_eos = {s.tokenizer.eos_token_id: -100.0}
    free = s.generate(prompt, **GREEDY, logit_bias=no_eos)
    assert free.finish_reason == "length" and len(free.token_ids) == GREEDY["max_new_tokens"]
    first = free.token_ids[0]
    steered = s.generate(prompt, **GREEDY, logit_bias={**no_eos, first: -100.0})
    assert first not in steered.token_ids
    with pytest.raises(ValueError, match="logit_bias"):
        s.generate(prompt, **GREEDY, logit_bias={10**6: 1.0})
