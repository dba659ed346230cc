"""The HTTP application: OpenAI-compatible routes in front of a worker pool.

The event loop only parses, answers and streams. Tokenization and policy loading run on one
preparation thread (the tokenizer is not shared between threads); generation runs on the
workers' threads, each with its own decoder, KV cache and copy of the tokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..loaders import open_checkpoint
from ..loaders.models import resolve_model
from ..runtime.decoder import Decoder
from ..runtime.policies import Policy
from ..runtime.session import ChatSession
from ..runtime.tokenizer import load_tokenizer
from .errors import APIError, error_body
from .metrics import CONTENT_TYPE, Metrics, StatusCounter
from .policy_cache import PolicyCache, server_policy
from .responses import DONE, Completion, sse
from .validation import (
    SPECULATIVE_MODES,
    CompletionRequest,
    PreparedPrompt,
    parse_json,
    parse_request,
    prepare_prompt,
)
from .workers import Done, Event, Failed, Job, Text, Worker, WorkerPool

log = logging.getLogger("ffnskip.serve")
DEFAULT_QUEUE_SIZE = 32
DISCONNECT_POLL_S = 0.25  # how often a request waiting for its worker checks its client
SHUTDOWN_JOIN_S = 30.0
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = ("/v1/models", CHAT, COMPLETIONS, "/health", "/metrics")


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclasses.dataclass
class _Server:
    model_name: str
    pool: WorkerPool
    metrics: Metrics
    policies: PolicyCache
    tokenizer: Any  # used on the preparation thread only
    preparer: ThreadPoolExecutor
    max_seq_len: int
    vocab_size: int
    api_key: str | None
    created: int
    speculative: str | None  # the default draft mode of requests, or None

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                           "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def prepare(self, request: CompletionRequest) -> tuple[PreparedPrompt, Policy]:
        prompt = prepare_prompt(request, self.tokenizer, self.max_seq_len)
        return prompt, self.policies.resolve(request.policy)


def create_app(
    model: str | os.PathLike[str] | None = None,
    *,
    workers: int = 1,
    device: str = "cpu",
    dtype: str | None = None,
    max_seq_len: int | None = None,
    num_threads: int | None = None,
    kv_cache_dtype: str = "auto",
    policy: Policy | str | None = None,
    api_key: str | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    model_name: str | None = None,
    speculative: str | None = None,
) -> Starlette:
    """An ASGI application serving ``model`` (a path or a name of ``ffnskip models list``;
    default: the bundled SmolLM2) with ``workers`` decoders. ``dtype`` is as in
    ``Decoder.from_pretrained`` (default "auto": the types the file stores). ``num_threads``
    is per decoder (default: the CPUs shared out among the workers), ``kv_cache_dtype`` as in
    ``Decoder``; ``policy`` is the
    default skip policy (a Policy, "first", or what ``load_policy`` takes); ``queue_size``
    requests may wait when every worker is busy; ``speculative`` ("ngram", "self" or "auto")
    drafts and verifies every request that does not say otherwise (lossless: the tokens are
    the policy's own). The model is loaded here; the workers start with the application (its
    lifespan)."""
    for name, value in (("workers", workers), ("queue_size", queue_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if speculative is not None and speculative not in SPECULATIVE_MODES[:-1]:
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES[:-1])} or "
                         f"None, got {speculative!r}")
    path = resolve_model(model)
    threads = num_threads or max(1, (os.cpu_count() or 1) // workers)
    # The checkpoint is opened once for every worker (memory-mapped, read as from_pretrained
    # reads it), and not kept: a rebuild opens it again.
    config, weights = open_checkpoint(path)
    decoders = [Decoder(config, weights, device, dtype, max_seq_len, threads, kv_cache_dtype)
                for _ in range(workers)]
    del weights
    default_policy = server_policy(policy, path)
    for decoder in decoders:
        decoder.set_policy(default_policy)
    tokenizer = load_tokenizer(path)
    metrics = Metrics()

    def make_decoder() -> Decoder:
        decoder = Decoder.from_pretrained(path, device, dtype, max_seq_len, threads,
                                          kv_cache_dtype)
        decoder.set_policy(default_policy)
        return decoder

    pool = WorkerPool(
        [Worker(i, ChatSession(d, copy.deepcopy(tokenizer)), make_decoder, metrics)
         for i, d in enumerate(decoders)], queue_size, metrics)
    server = _Server(
        model_name=model_name or _model_name(path), pool=pool, metrics=metrics,
        policies=PolicyCache(path, config.num_layers, default_policy), tokenizer=tokenizer,
        preparer=ThreadPoolExecutor(1, thread_name_prefix="ffnskip-prepare"),
        max_seq_len=decoders[0].max_seq_len, vocab_size=config.vocab_size, api_key=api_key,
        created=int(time.time()), speculative=speculative,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool.start()
        try:
            yield
        finally:
            await asyncio.to_thread(pool.close, SHUTDOWN_JOIN_S)
            server.preparer.shutdown(wait=False)

    async def models(request: Request) -> Response:
        server.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": server.created,
             "owned_by": "ffnskip"}]})

    async def chat(request: Request) -> Response:
        return await _complete(server, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(server, request, chat=False)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": server.model_name,
                             "workers": len(pool.workers), "busy": pool.busy,
                             "queue": pool.queue_length})

    async def metrics_text(request: Request) -> Response:
        text = metrics.render(pool.queue_length, pool.busy, len(pool.workers))
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    routes = [
        Route("/v1/models", _answering_errors(models), methods=["GET"]),
        Route(CHAT, _answering_errors(chat), methods=["POST"]),
        Route(COMPLETIONS, _answering_errors(completions), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ]
    return Starlette(
        routes=routes, lifespan=lifespan,
        middleware=[Middleware(StatusCounter, metrics=metrics, endpoints=ENDPOINTS)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
    )


async def _complete(server: _Server, request: Request, chat: bool) -> Response:
    server.authorize(request)
    parsed = parse_request(parse_json(await request.body()), chat, server.model_name,
                           server.vocab_size)
    loop = asyncio.get_running_loop()
    prompt, policy = await loop.run_in_executor(server.preparer, server.prepare, parsed)
    options = {"max_new_tokens": prompt.max_tokens, "temperature": parsed.temperature,
               "top_k": parsed.top_k, "top_p": parsed.top_p, "seed": parsed.seed,
               "stop": parsed.stop, "logit_bias": parsed.logit_bias,
               "speculative": server.speculative if parsed.speculative is None
               else None if parsed.speculative == "none" else parsed.speculative}
    job = Job(prompt.ids, policy, options, loop)
    server.pool.submit(job)
    completion = Completion.new(chat, server.model_name)
    streaming = False
    try:
        # The status is known once a worker has taken the job: headers wait for it.
        event = await _next_event(job, request)
        if parsed.stream and not isinstance(event, Failed):
            streaming = True  # the stream cancels the job when it ends
            return StreamingResponse(_stream(server, job, completion, parsed.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        while not isinstance(event, (Done, Failed)):
            event = await _next_event(job, request)
        if isinstance(event, Failed):
            raise event.error
        return JSONResponse(completion.body(event.result))
    except _ClientGone:
        return Response(status_code=499)  # nginx's "client closed request", for the metrics
    finally:
        if not streaming:
            server.pool.cancel(job)


async def _next_event(job: Job, request: Request) -> Event:
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _ClientGone() from None


async def _stream(server: _Server, job: Job, completion: Completion,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that leaves closes this generator at its next chunk,
    which cancels the job: the worker stops at its next token."""
    try:
        if completion.chat:
            yield completion.chunk(first=True)
        while True:
            event = await job.events.get()
            if isinstance(event, Text):
                yield completion.chunk(event.text)
            elif isinstance(event, Done):
                yield completion.chunk(finish_reason=event.result.finish_reason)
                if include_usage:
                    yield completion.usage_chunk(event.result)
                break
            elif isinstance(event, Failed):
                yield sse(event.error.body())
                break
        yield DONE
    finally:
        server.pool.cancel(job)


def _answering_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Unexpected exceptions become an OpenAI-style 500 (Starlette's own 500 is plain text,
    and is sent outside the middleware that counts responses)."""

    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except (APIError, HTTPException):
            raise
        except Exception as e:
            log.exception("%s failed", request.url.path)
            raise APIError(500, f"internal error: {type(e).__name__}: {e}", None,
                           "internal_error") from e

    return answer


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code,
                        headers=exc.headers)


def _model_name(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name
