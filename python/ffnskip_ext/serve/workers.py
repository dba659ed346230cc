"""The worker pool: N threads, each owning a ``ChatSession`` (a decoder and its KV cache),
fed from one bounded FIFO queue.

A job reports to the event loop through an asyncio queue (``Started``, ``Text`` pieces,
then ``Done`` or ``Failed``); the worker never waits for the loop. A new job goes to the
idle worker whose cache holds the longest prefix of its prompt (the next turn of a chat
finds its conversation); when every worker is busy it waits in the queue, and when the
queue is full it is refused (429).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..runtime.decoder import Decoder
from ..runtime.generate import GenerationResult
from ..runtime.policies import Policy
from ..runtime.session import ChatSession
from .errors import APIError, bad_request
from .metrics import Metrics

log = logging.getLogger("ffnskip.serve")
RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class Started:
    """A worker took the job and applied its policy; text follows."""


@dataclasses.dataclass(frozen=True)
class Text:
    text: str


@dataclasses.dataclass(frozen=True)
class Done:
    result: GenerationResult


@dataclasses.dataclass(frozen=True)
class Failed:
    error: APIError


Event = Started | Text | Done | Failed


class Job:
    """One generation: what ``ChatSession.generate`` gets, and the channel back."""

    def __init__(self, prompt_ids: list[int], policy: Policy, options: dict[str, Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids = prompt_ids
        self.policy = policy
        self.options = options  # ChatSession.generate's keyword arguments
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: Event) -> None:
        """From any thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()


class Worker:
    """A thread's session; rebuilt with a fresh decoder after an unexpected error."""

    def __init__(self, index: int, session: ChatSession,
                 make_decoder: Callable[[], Decoder], metrics: Metrics) -> None:
        self.index = index
        self.session = session
        self.make_decoder = make_decoder
        self.metrics = metrics
        # Guarded by the pool's lock:
        self.idle = False  # waiting for a job
        self.handoff: Job | None = None  # given to this worker, not yet taken
        self.current: Job | None = None

    def run(self, job: Job) -> None:
        if job.cancelled:
            self.metrics.count_cancelled_in_queue()
            return
        try:
            self._generate(job)
        except Exception as e:  # the decoder may be inconsistent now
            log.exception("worker %d: generation failed; rebuilding its decoder", self.index)
            job.push(Failed(APIError(500, f"internal error: {type(e).__name__}: {e}", None,
                                     "internal_error")))
            self._rebuild()

    def _generate(self, job: Job) -> None:
        try:
            self.session.set_policy(job.policy)
        except ValueError as e:  # refused by the engine: the decoder kept its policy
            job.push(Failed(bad_request(f"ffnskip.policy: {e}", "ffnskip.policy")))
            return
        job.push(Started())
        decoder = self.session.decoder
        decoder.reset_stats()
        try:
            result = self.session.generate(
                job.prompt_ids, **job.options, stream=lambda text: job.push(Text(text)),
                cancelled=lambda: job.cancelled,
            )
        except (ValueError, TypeError) as e:  # bad input, refused with the cache unchanged
            job.push(Failed(bad_request(str(e))))
            return
        self.metrics.count_generation(result, decoder.stats())
        job.push(Done(result))

    def _rebuild(self) -> None:
        try:
            self.session = ChatSession(self.make_decoder(), self.session.tokenizer)
        except Exception:
            log.exception("worker %d: rebuilding failed; it keeps its decoder, reset",
                          self.index)
            self.session.reset()


class WorkerPool:
    def __init__(self, workers: list[Worker], queue_size: int, metrics: Metrics) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._closing = False
        self._threads = [threading.Thread(target=self._serve, args=(w,), daemon=True,
                                          name=f"ffnskip-worker-{w.index}") for w in workers]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def busy(self) -> int:
        with self._cond:
            return sum(w.current is not None or w.handoff is not None for w in self.workers)

    def submit(self, job: Job) -> None:
        """Hand ``job`` to an idle worker or queue it; APIError 429 when the queue is full,
        503 when the pool is closing."""
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down", None, "shutting_down")
            idle = [w for w in self.workers if w.idle and w.handoff is None]
            if idle:  # an idle worker's session is not in use: reading it is safe
                best = max(idle, key=lambda w: w.session.reusable_tokens(job.prompt_ids))
                best.handoff = job
                self._cond.notify_all()
                return
            if len(self._pending) >= self.queue_size:
                raise APIError(429, f"all workers are busy and {self.queue_size} requests are "
                               "waiting; retry later", None, "queue_full",
                               {"Retry-After": str(RETRY_AFTER_S)})
            self._pending.append(job)

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at its next token, or drop it from the queue."""
        job.cancel()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.count_cancelled_in_queue()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, cancel every job, and wait for the threads."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending) + [w.handoff for w in self.workers if w.handoff]
            running = [w.current for w in self.workers if w.current]
            self._pending.clear()
            for w in self.workers:
                w.handoff = None
            self._cond.notify_all()
        for job in waiting:
            job.push(Failed(APIError(503, "the server is shutting down", None,
                                     "shutting_down")))
        for job in waiting + running:
            job.cancel()
        for thread in self._threads:
            thread.join(timeout)

    def _serve(self, worker: Worker) -> None:
        while (job := self._take(worker)) is not None:
            worker.run(job)
            with self._cond:
                worker.current = None

    def _take(self, worker: Worker) -> Job | None:
        with self._cond:
            while True:
                job, worker.handoff = worker.handoff, None
                if job is None and self._pending:
                    job = self._pending.popleft()
                if job is not None:
                    worker.idle, worker.current = False, job
                    return job
                if self._closing:
                    return None
                worker.idle = True
                self._cond.wait()
