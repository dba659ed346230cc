"""The engine's FFN-SkipLLM rule on hand-made score sequences and against a transcription."""

from __future__ import annotations

import numpy as np
import pytest

from ffnskip_ext.runtime.policies import FFNSkipPolicy, simulate_ffn_skip
from skip_reference import reference_decisions

L = 8
HIGH, LOW = 0.99, 0.5


def decide(scores, **kwargs) -> list[list[int]]:
    policy = FFNSkipPolicy(**{"warmup_tokens": 0, "full_token_interval": 0, "cold_start": 1,
                              "cold_end": 1, **kwargs})
    return simulate_ffn_skip(policy, np.array(scores, dtype=np.float32)).astype(int).tolist()


def test_previous_computed_layer_decides_and_run_is_contiguous() -> None:
    # Layer 2 scores high: layers 3.. are skipped while the budget lasts (K=2), then the run
    # ends and is not restarted although layer 5 scores high again.
    row = [LOW, LOW, HIGH, LOW, LOW, HIGH, HIGH, LOW]
    assert decide([row], max_skips_per_token=2) == [[0, 0, 0, 1, 1, 0, 0, 0]]


def test_skipped_layers_keep_the_previous_score() -> None:
    row = [LOW, HIGH, LOW, LOW, LOW, LOW, LOW, LOW]  # scores of skipped layers are ignored
    assert decide([row]) == [[0, 0, 1, 1, 1, 1, 1, 0]]  # unlimited K, cold_end=1


def test_cold_layers_are_never_skipped() -> None:
    row = [HIGH] * L
    assert decide([row], cold_start=3, cold_end=2) == [[0, 0, 0, 1, 1, 1, 0, 0]]


def test_a_cold_layer_ends_the_run() -> None:
    row = [HIGH] * L
    assert decide([row], cold_start=1, cold_end=1, max_skips_per_token=10) == [
        [0, 1, 1, 1, 1, 1, 1, 0]
    ]


def test_warmup_and_interleaved_dense_tokens() -> None:
    scores = [[HIGH] * L] * 12
    got = decide(scores, warmup_tokens=3, full_token_interval=4, max_skips_per_token=1)
    skipping_tokens = [t for t, row in enumerate(got) if any(row)]
    # tokens 0-2 warm up; after that every 4th (pattern K,K,K,0) runs dense: 6 and 10
    assert skipping_tokens == [3, 4, 5, 7, 8, 9, 11]


def test_threshold_is_strict_and_clamped() -> None:
    row = [0.9] * L
    assert not any(decide([row], threshold=0.9)[0])
    assert any(decide([row], threshold=0.8999)[0])
    assert not any(decide([[1.5] * L], threshold=1.0)[0])  # clamped to 1.0: 1.0 never skips
    assert not any(decide([[-1.0] * L], threshold=-1.0, cold_start=0, cold_end=0)[0])


def test_zero_budget_never_skips() -> None:
    assert not any(decide([[HIGH] * L], max_skips_per_token=0)[0])


@pytest.mark.parametrize("seed", range(20))
def test_engine_rule_equals_transcription_on_random_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.8, 1.0, size=(30, 12)).astype(np.float32)
    args = dict(threshold=float(rng.uniform(0.85, 0.99)), warmup=int(rng.integers(0, 5)),
                interval=int(rng.integers(0, 4)), max_skips=int(rng.integers(0, 6)),
                cold_start=int(rng.integers(0, 3)), cold_end=int(rng.integers(0, 3)))
    policy = FFNSkipPolicy(threshold=args["threshold"], warmup_tokens=args["warmup"],
                           full_token_interval=args["interval"],
                           max_skips_per_token=args["max_skips"],
                           cold_start=args["cold_start"], cold_end=args["cold_end"])
    ours = simulate_ffn_skip(policy, scores).tolist()
    assert ours == reference_decisions(scores.tolist(), **args)
