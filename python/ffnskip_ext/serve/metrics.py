"""Counters of the server and their Prometheus text exposition (``GET /metrics``)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable
from typing import Any

from ..runtime.decoder import DecodeStats
from ..runtime.generate import GenerationResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Updated by the event loop (responses) and the worker threads (generations)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._responses: collections.Counter[tuple[str, int]] = collections.Counter()
        self._totals: collections.Counter[str] = collections.Counter()
        self._decode_seconds = 0.0

    def count_response(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._responses[(endpoint, status)] += 1

    def count_generation(self, result: GenerationResult, stats: DecodeStats) -> None:
        """One finished generation; ``stats`` are its decoder's counters reset before it."""
        steps = stats.decode_tokens
        with self._lock:
            self._totals["prompt_tokens"] += result.prompt_tokens
            self._totals["cached_prompt_tokens"] += result.cached_tokens
            self._totals["generation_tokens"] += len(result.token_ids)
            self._totals["cancelled"] += result.finish_reason == "cancelled"
            self._totals["decode_steps"] += steps
            self._totals["ffn_blocks"] += steps * len(stats.ffn_skipped)
            self._totals["ffn_blocks_skipped"] += int(stats.ffn_skipped.sum())
            if result.speculative is not None:
                self._totals["drafted_tokens"] += result.speculative.drafted
                self._totals["accepted_tokens"] += result.speculative.accepted
            if steps and result.decode_tokens_per_s > 0:
                self._decode_seconds += steps / result.decode_tokens_per_s

    def count_cancelled_in_queue(self) -> None:
        with self._lock:
            self._totals["cancelled"] += 1

    def render(self, queue_length: int, busy_workers: int, workers: int) -> str:
        with self._lock:
            totals = dict(self._totals)
            responses = sorted(self._responses.items())
            decode_seconds = self._decode_seconds
        steps, blocks = totals.get("decode_steps", 0), totals.get("ffn_blocks", 0)
        lines: list[str] = []
        _family(lines, "ffnskip_requests_total", "counter",
                "HTTP responses by endpoint and status code",
                ((f'{{endpoint="{e}",code="{c}"}}', n) for (e, c), n in responses))
        for name, key, text in (
            ("ffnskip_prompt_tokens_total", "prompt_tokens", "prompt tokens of generations"),
            ("ffnskip_cached_prompt_tokens_total", "cached_prompt_tokens",
             "prompt tokens taken from a worker's KV cache instead of prefilled"),
            ("ffnskip_generation_tokens_total", "generation_tokens", "tokens generated"),
            ("ffnskip_decode_steps_total", "decode_steps", "decode steps run"),
            ("ffnskip_cancelled_requests_total", "cancelled",
             "generations stopped or dropped because their client left"),
            ("ffnskip_ffn_blocks_total", "ffn_blocks", "FFN blocks of decode steps"),
            ("ffnskip_ffn_blocks_skipped_total", "ffn_blocks_skipped",
             "FFN blocks the skip policy skipped"),
            ("ffnskip_speculative_drafted_tokens_total", "drafted_tokens",
             "tokens drafted by speculative decoding"),
            ("ffnskip_speculative_accepted_tokens_total", "accepted_tokens",
             "drafted tokens the verification kept"),
        ):
            _family(lines, name, "counter", text, [("", totals.get(key, 0))])
        _family(lines, "ffnskip_decode_seconds_total", "counter",
                "seconds spent in decode steps", [("", decode_seconds)])
        _family(lines, "ffnskip_decode_tokens_per_second", "gauge",
                "decode steps per second of one sequence, since the start",
                [("", steps / decode_seconds if decode_seconds else 0.0)])
        _family(lines, "ffnskip_ffn_skip_ratio", "gauge",
                "skipped / all FFN blocks of decode steps, since the start",
                [("", totals.get("ffn_blocks_skipped", 0) / blocks if blocks else 0.0)])
        drafted = totals.get("drafted_tokens", 0)
        _family(lines, "ffnskip_speculative_acceptance_rate", "gauge",
                "accepted / drafted tokens of speculative decoding, since the start",
                [("", totals.get("accepted_tokens", 0) / drafted if drafted else 0.0)])
        _family(lines, "ffnskip_queue_length", "gauge", "requests waiting for a worker",
                [("", queue_length)])
        _family(lines, "ffnskip_workers_busy", "gauge", "workers generating",
                [("", busy_workers)])
        _family(lines, "ffnskip_workers", "gauge", "workers", [("", workers)])
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: Iterable[tuple[str, float]]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value}" for labels, value in samples]


class StatusCounter:
    """ASGI middleware: counts every HTTP response by endpoint and status code (paths
    outside ``endpoints`` as "other", so that the label set stays bounded)."""

    def __init__(self, app: Any, metrics: Metrics, endpoints: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_response(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
