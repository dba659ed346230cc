"""Next-token selection from a logits vector: greedy, temperature, top-k, top-p, min-p and a
repetition penalty."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy (argmax); so is any temperature too small to change it.
    ``repeat_penalty`` p > 1 discourages every token already in the sequence (prompt and
    answer, as transformers' ``repetition_penalty``): its logit is divided by p when positive,
    multiplied by p otherwise; it applies to greedy decoding too. ``min_p`` keeps the tokens
    whose probability is at least ``min_p`` times the most likely one's. NumPy scalars are
    accepted and stored as Python numbers."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) \
                or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}")


def penalised(logits: np.ndarray, params: SamplingParams, previous: Sequence[int]) -> np.ndarray:
    """The logits with the repetition penalty applied to the tokens of ``previous``."""
    if params.repeat_penalty == 1.0 or not len(previous):
        return logits
    seen = np.unique(np.asarray(previous, dtype=np.int64))
    out = logits.astype(np.float32, copy=True)
    values = out[seen]
    out[seen] = np.where(values > 0, values / params.repeat_penalty,
                         values * params.repeat_penalty)
    return out


def probabilities(logits: np.ndarray, params: SamplingParams,
                  previous: Sequence[int] = ()) -> np.ndarray:
    """The distribution ``sample`` draws from when temperature > 0 (float64, sums to 1)."""
    logits = penalised(logits, params, previous).astype(np.float64)
    # Shifted before dividing, so that a tiny temperature sends every other token to -inf
    # (probability 0) instead of overflowing to inf - inf = NaN.
    with np.errstate(over="ignore"):
        scaled = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = order[: int(np.searchsorted(cumulative, params.top_p) + 1)]
        truncated = np.zeros_like(probs)
        truncated[keep] = probs[keep]
        probs = truncated / truncated.sum()
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           previous: Sequence[int] = ()) -> int:
    """Greedy when temperature is 0; otherwise sample the tempered, truncated distribution.
    ``previous``: the token ids of the sequence so far, for the repetition penalty."""
    if params.temperature == 0.0:
        return int(np.argmax(penalised(logits, params, previous)))
    probs = probabilities(logits, params, previous)
    return int(rng.choice(probs.size, p=probs))
