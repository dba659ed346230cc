"""Decoder.truncate: the cache cut back to a position continues exactly like a decoder that
never saw what followed; bad positions are refused and change nothing."""

from __future__ import annotations

import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext import FFNSkipPolicy, FiRSTPolicy, Routers

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture()
def path(tiny_model_dir):
    return tiny_model_dir("llama_gqa_untied_h72")[1]


def fresh(path, tokens: list[int], steps: list[int]) -> list[np.ndarray]:
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    out = [decoder.prefill(tokens)]
    out += [decoder.step(t) for t in steps]
    return out


def test_truncate_then_decode_equals_a_fresh_decoder(path) -> None:
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    decoder.prefill(PROMPT)
    for token in (7, 8, 9, 10):
        decoder.step(token)
    decoder.truncate(len(PROMPT) + 1)  # keep the first decoded token only
    assert decoder.position == len(PROMPT) + 1
    got = [decoder.step(t) for t in (20, 21)]
    want = fresh(path, PROMPT, [7, 20, 21])[2:]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # into the prompt, then a prefill of a different continuation
    decoder.truncate(3)
    np.testing.assert_array_equal(decoder.prefill([11, 12]), fresh(path, PROMPT[:3] + [11, 12],
                                                                   [])[0])


def test_truncate_to_zero_and_to_the_position(path) -> None:
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    decoder.prefill(PROMPT)
    decoder.truncate(decoder.position)  # nothing cut
    np.testing.assert_array_equal(decoder.step(7), fresh(path, PROMPT, [7])[1])
    decoder.truncate(0)
    np.testing.assert_array_equal(decoder.prefill([5, 6]), fresh(path, [5, 6], [])[0])


@pytest.mark.parametrize("position, exc", [(-1, ValueError), (9, ValueError), (2**40, ValueError),
                                           (1.5, TypeError), ("3", TypeError), (True, TypeError)])
def test_bad_truncate_changes_nothing(path, position, exc) -> None:
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    decoder.prefill(PROMPT)
    with pytest.raises(exc):
        decoder.truncate(position)
    assert decoder.position == len(PROMPT)
    np.testing.assert_array_equal(decoder.step(7), fresh(path, PROMPT, [7])[1])


def test_warmup_continues_the_generation_after_a_cut(path) -> None:
    """Decode indices count from the last prefill: after cutting two of five decoded tokens,
    the next step is the generation's fourth, inside a warm-up of four."""
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    decoder.set_policy(FFNSkipPolicy(threshold=-1.0, warmup_tokens=4, cold_start=0, cold_end=0,
                                     full_token_interval=0))
    decoder.prefill(PROMPT)
    for token in (7, 8, 9, 10, 11):
        decoder.step(token)
    decoder.truncate(len(PROMPT) + 3)
    decoder.reset_stats()
    decoder.step(12)  # decode index 3: warm-up, nothing skipped
    decoder.step(13)  # decode index 4: skips
    stats = decoder.stats()
    assert stats.warmup_tokens == 1
    assert stats.ffn_skipped.sum() > 0
    # a prefill starts a new generation: its first step is in warm-up again
    decoder.prefill([14])
    decoder.reset_stats()
    decoder.step(15)
    assert decoder.stats().warmup_tokens == 1 and decoder.stats().ffn_skipped.sum() == 0


def test_first_routing_survives_a_cut_and_a_cut_to_zero_routes_again(path) -> None:
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    config = decoder.config
    gates = [1.0, 0.0, 1.0]  # layer 1 routed off for every prompt
    decoder.set_policy(FiRSTPolicy(Routers.constant(config.num_layers, config.hidden_size,
                                                    gates)))
    decoder.prefill(PROMPT)
    decoder.step(7)
    decoder.truncate(len(PROMPT))
    assert decoder.stats().layer_active.tolist() == [True, False, True]
    after_cut = decoder.step(8)
    reference = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    reference.set_policy(decoder.policy)
    reference.prefill(PROMPT)
    np.testing.assert_array_equal(after_cut, reference.step(8))
    decoder.truncate(0)
    decoder.set_policy(FiRSTPolicy(Routers.constant(config.num_layers, config.hidden_size,
                                                    1.0)))
    decoder.prefill(PROMPT)  # position 0: the new policy routes the new sequence
    assert decoder.stats().layer_active.all()
