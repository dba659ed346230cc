"""The greedy decode loop the Python decode benchmarks time (no torch, so that any of them
can import it)."""

from __future__ import annotations

import time

import numpy as np

import ffnskip_ext


def greedy_decode_rate(decoder: ffnskip_ext.Decoder, prompt: list[int], tokens: int) -> float:
    """Tokens/s of `tokens` greedy steps after a prefill of `prompt` from an empty cache."""
    decoder.reset()
    token = int(np.argmax(decoder.prefill(prompt)))
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(decoder.step(token)))
    return tokens / (time.perf_counter() - start)
