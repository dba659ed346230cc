"""An independent transcription of the FFN-SkipLLM rule of docs/methods.md,
used as the reference the engine is tested against."""

from __future__ import annotations

import math


def is_dense_token(decode_index: int, warmup: int, interval: int) -> bool:
    if decode_index < warmup:
        return True
    return interval > 0 and (decode_index - warmup + 1) % interval == 0


class ReferenceRule:
    def __init__(self, num_layers: int, threshold: float, warmup: int, interval: int,
                 max_skips: int, cold_start: int, cold_end: int) -> None:
        self.num_layers, self.threshold = num_layers, threshold
        self.warmup, self.interval, self.max_skips = warmup, interval, max_skips
        self.cold_start, self.cold_end = cold_start, cold_end
        self.decode_index = 0

    def begin_token(self) -> None:
        self.dense = is_dense_token(self.decode_index, self.warmup, self.interval)
        self.budget, self.in_run, self.prev_score = self.max_skips, False, None

    def skip(self, layer: int) -> bool:
        eligible = self.cold_start <= layer < self.num_layers - self.cold_end
        prev = self.prev_score
        if (not self.dense and eligible and self.budget > 0 and prev is not None
                and prev > self.threshold):
            self.budget -= 1
            self.in_run = True
            return True
        if self.in_run:
            self.budget = 0
        return False

    def record(self, score: float) -> None:
        self.prev_score = min(1.0, max(-1.0, score)) if not math.isnan(score) else score

    def end_token(self) -> None:
        self.decode_index += 1


def reference_decisions(scores, **rule_args) -> list[list[bool]]:
    """Decisions for a [tokens][layers] score table (scores of skipped layers ignored)."""
    rule = ReferenceRule(num_layers=len(scores[0]), **rule_args)
    out = []
    for row in scores:
        rule.begin_token()
        decisions = []
        for layer, score in enumerate(row):
            skipped = rule.skip(layer)
            if not skipped:
                rule.record(float(score))
            decisions.append(skipped)
        rule.end_token()
        out.append(decisions)
    return out
