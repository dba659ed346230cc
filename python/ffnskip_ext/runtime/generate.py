"""Text generation: tokenizer in, tokens and text out, with sampling, stop strings and streaming."""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .decoder import Decoder
from .sampling import SamplingParams, sample
from .speculative import (
    Speculative,
    SpeculativeStats,
    prepare_speculation,
    resolve_speculative,
    speculative_decode,
)

Message = dict[str, str]


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    # "eos", "stop" (a stop string), "length" (max_new_tokens or context), "cancelled"
    finish_reason: str
    prefill_ms: float
    decode_tokens_per_s: float
    cached_tokens: int = 0  # prompt tokens whose K/V were already cached (ChatSession)
    speculative: SpeculativeStats | None = None  # drafts and their acceptance; None without


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What a generation decodes and where it ends, checked once (``DecodeOptions.make``)."""

    max_new_tokens: int
    sampling: SamplingParams
    seed: int | None
    stops: tuple[str, ...]
    stop_at: Callable[[str], int | None] | None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @classmethod
    def make(
        cls,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_at: Callable[[str], int | None] | None = None,
        logit_bias: Mapping[int, float] | None = None,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
    ) -> DecodeOptions:
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        bias = tuple((int(t), float(b)) for t, b in (logit_bias or {}).items())
        if not all(math.isfinite(b) for _, b in bias):
            raise ValueError("logit_bias values must be finite numbers")
        return cls(int(max_new_tokens), sampling, None if seed is None else int(seed),
                   _stop_strings(stop), stop_at, bias)


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """A string is one stop string (as in transformers and vLLM), not its characters."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str):
            raise TypeError(f"stop must be a string or a list of strings, got {s!r} in it")
        _check_text(s, "stop")
    return tuple(s for s in stops if s)


def _check_text(text: str, name: str) -> None:
    """Refuses what no tokenizer can encode: a lone surrogate (from a bad decode or JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: lone surrogate {text[e.start]!r} at index {e.start} "
                         "(not valid Unicode text)") from None


def encode_prompt(tokenizer: Any, prompt_or_messages: str | Sequence[Message]) -> list[int]:
    """A string is encoded as it is; a list of chat messages goes through the chat template."""
    if isinstance(prompt_or_messages, str):
        _check_text(prompt_or_messages, "prompt")
        return list(tokenizer.encode(prompt_or_messages))
    messages = list(prompt_or_messages)
    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise TypeError(f"messages[{i}]['{key}'] must be a string, got "
                                f"{type(m.get(key)).__name__}")
            _check_text(m[key], f"messages[{i}]['{key}']")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in transformers 5
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def check_prompt_fits(decoder: Decoder, prompt_tokens: int) -> None:
    if prompt_tokens >= decoder.max_seq_len:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens does not fit max_seq_len {decoder.max_seq_len}"
        )


def generate(
    decoder: Decoder,
    tokenizer: Any,
    prompt_or_messages: str | Sequence[Message],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: Callable[[str], None] | None = None,
    stop_at: Callable[[str], int | None] | None = None,
    min_p: float = 0.0,
    repeat_penalty: float = 1.0,
    speculative: str | Speculative | None = None,
) -> GenerationResult:
    """Reset the decoder, prefill the prompt and decode up to ``max_new_tokens`` tokens.

    ``stream`` receives each new piece of text as soon as it is decoded. Generation ends at an
    end-of-sequence token, at a ``stop`` string (excluded from the text), where
    ``stop_at(text)`` returns a position (the text is cut there; for ends a stop string
    cannot express), after ``max_new_tokens`` or when the context is full.

    ``speculative`` ("ngram", "self", "auto" or a ``Speculative``) drafts tokens and verifies
    them with the decoder's policy in one pass: the output is that of plain decoding (greedy:
    token for token; sampling: the same distribution); ``result.speculative`` reports the
    drafts' acceptance.
    """
    options = DecodeOptions.make(max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at,
                                 min_p=min_p, repeat_penalty=repeat_penalty)
    spec = speculation_for(speculative, options)
    prompt_ids = encode_prompt(tokenizer, prompt_or_messages)
    check_prompt_fits(decoder, len(prompt_ids))
    with decoder.exclusive():  # other threads' calls would interleave with this generation
        if spec is not None:
            prepare_speculation(decoder, spec)
        decoder.reset()
        return prefill_and_decode(decoder, tokenizer, prompt_ids, 0, options, stream,
                                  speculative=spec)


def speculation_for(speculative: str | Speculative | None,
                    options: DecodeOptions) -> Speculative | None:
    """The resolved speculation of a generation, or None; refused before any work where the
    verification rule cannot give plain decoding's tokens."""
    spec = resolve_speculative(speculative)
    if spec is not None and options.sampling.repeat_penalty != 1.0:
        raise ValueError("speculative: repeat_penalty is not supported with speculative decoding "
                         "(its drafts are accepted against the unpenalised distribution)")
    return spec


def prefill_and_decode(
    decoder: Decoder,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    cached_tokens: int,
    options: DecodeOptions,
    stream: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    speculative: Speculative | None = None,
) -> GenerationResult:
    """The generation loop of ``generate`` and ``ChatSession``: the cache holds the first
    ``cached_tokens`` prompt ids; prefill the rest, then sample, detokenize, stream and stop.
    ``cancelled()`` is asked before every decode step (or speculative round); True ends the
    generation there. With ``speculative`` (the caller ran ``prepare_speculation`` before
    touching the cache), drafts are verified by the decoder's policy and the tokens are those
    of plain decoding (greedy: the same; sampling: the same distribution)."""
    eos_ids = set(decoder.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    rng = np.random.default_rng(options.seed)
    bias = None
    if options.logit_bias:
        ids, values = zip(*options.logit_bias, strict=True)
        if not all(0 <= t < decoder.config.vocab_size for t in ids):
            raise ValueError(f"logit_bias: token ids must be in [0, {decoder.config.vocab_size})")
        bias = np.zeros(decoder.config.vocab_size, dtype=np.float32)
        bias[list(ids)] = values

    start = time.perf_counter()
    logits = decoder.prefill(prompt_ids[cached_tokens:])
    prefill_ms = (time.perf_counter() - start) * 1e3

    transcript = Transcript(tokenizer, eos_ids, options, stream, len(prompt_ids),
                            decoder.max_seq_len)
    spec_stats = None
    decode_start = time.perf_counter()
    if speculative is not None:
        spec_stats = speculative_decode(decoder, speculative, prompt_ids, logits, transcript,
                                        options, bias, rng, cancelled)
    else:
        _plain_decode(decoder, prompt_ids, logits, transcript, options, bias, rng, cancelled)
    decode_s = time.perf_counter() - decode_start
    decided = transcript.decided_tokens
    transcript.flush()
    return GenerationResult(
        text=transcript.text,
        token_ids=transcript.tokens,
        prompt_tokens=len(prompt_ids),
        finish_reason=transcript.finish_reason,
        prefill_ms=prefill_ms,
        decode_tokens_per_s=decided / decode_s if decided and decode_s > 0 else 0.0,
        cached_tokens=cached_tokens,
        speculative=spec_stats,
    )


def _plain_decode(decoder: Decoder, prompt_ids: Sequence[int], logits: np.ndarray,
                  transcript: Transcript, options: DecodeOptions, bias: np.ndarray | None,
                  rng: np.random.Generator, cancelled: Callable[[], bool] | None) -> None:
    """One step per token."""
    penalise = options.sampling.repeat_penalty != 1.0
    while not transcript.done:
        previous = [*prompt_ids, *transcript.tokens] if penalise else ()
        if transcript.push(sample(logits if bias is None else logits + bias, options.sampling,
                                  rng, previous)):
            break
        if cancelled is not None and cancelled():
            transcript.cancel()
            break
        logits = decoder.step(transcript.tokens[-1])


class Transcript:
    """The generated tokens and text as tokens arrive, for the plain and the speculative loop:
    the end of sequence, stop strings, ``max_new_tokens`` and the end of the context decide
    where the generation ends, and the text settled so far goes to ``stream``."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], options: DecodeOptions,
                 stream: Callable[[str], None] | None, prompt_tokens: int,
                 max_seq_len: int) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason = "length"
        self.done = options.max_new_tokens == 0
        self._tokenizer, self._eos_ids, self._options = tokenizer, eos_ids, options
        self._stream, self._emitted = stream, ""
        self._prompt_tokens, self._max_seq_len = prompt_tokens, max_seq_len

    def push(self, token: int) -> bool:
        """Takes the next token; True when the generation ends with it (an end-of-sequence
        token ends it without being kept)."""
        if token in self._eos_ids:
            return self._finish("eos")
        self.tokens.append(token)
        new_text = self._tokenizer.decode(self.tokens, skip_special_tokens=True)
        hit = _first_stop(new_text, self._options.stops, self._options.stop_at)
        if hit is not None:
            new_text = new_text[:hit]
        self.text = new_text
        self._emitted = _emit(self._stream, self._emitted, _settled(new_text, self._options.stops))
        if hit is not None:
            return self._finish("stop")
        # The last token is never fed back, so the cache holds one token less than the text.
        context_full = self._prompt_tokens + len(self.tokens) - 1 >= self._max_seq_len
        if len(self.tokens) == self._options.max_new_tokens or context_full:
            return self._finish("length")
        return False

    def cancel(self) -> None:
        self._finish("cancelled")

    @property
    def cache_tokens(self) -> int:
        """Tokens the cache of plain decoding holds at this point: the prompt and every
        generated token fed back (all but the last, which an end of sequence followed)."""
        fed_back = len(self.tokens) - (0 if self.finish_reason == "eos" else 1)
        return self._prompt_tokens + max(0, fed_back)

    @property
    def decided_tokens(self) -> int:
        """Tokens decided after the prefill's (plain decoding: its steps)."""
        return self.cache_tokens - self._prompt_tokens

    def flush(self) -> None:
        """Streams what is left of the text (held back while it could still change)."""
        self._emitted = _emit(self._stream, self._emitted, self.text)

    def _finish(self, reason: str) -> bool:
        self.finish_reason = reason
        self.done = True
        return True


def _settled(text: str, stops: Sequence[str]) -> str:
    """The part of ``text`` later tokens cannot change: a trailing U+FFFD is usually a
    multi-byte character still missing bytes, and a suffix that begins a stop string may
    still turn into it."""
    ready = text.rstrip("\ufffd")
    held = max(
        (k for s in stops for k in range(1, len(s)) if ready.endswith(s[:k])), default=0
    )
    return ready[: len(ready) - held]


def _emit(stream: Callable[[str], None] | None, emitted: str, ready: str) -> str:
    """Sends the part of ``ready`` beyond what was already streamed; returns what now is."""
    if stream is None or len(ready) <= len(emitted) or not ready.startswith(emitted):
        return emitted
    stream(ready[len(emitted) :])
    return ready


def _first_stop(text: str, stops: Sequence[str],
                stop_at: Callable[[str], int | None] | None) -> int | None:
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    if stop_at is not None and (end := stop_at(text)) is not None:
        positions.append(end)
    return min(positions) if positions else None
