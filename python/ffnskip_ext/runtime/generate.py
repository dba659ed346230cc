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
) -> GenerationResult:
    """Reset the decoder, prefill the prompt and decode up to ``max_new_tokens`` tokens.

    ``stream`` receives each new piece of text as soon as it is decoded. Generation ends at an
    end-of-sequence token, at a ``stop`` string (excluded from the text), where
    ``stop_at(text)`` returns a position (the text is cut there; for ends a stop string
    cannot express), after ``max_new_tokens`` or when the context is full.
    """
    options = DecodeOptions.make(max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at,
                                 min_p=min_p, repeat_penalty=repeat_penalty)
    prompt_ids = encode_prompt(tokenizer, prompt_or_messages)
    check_prompt_fits(decoder, len(prompt_ids))
    with decoder.exclusive():  # other threads' calls would interleave with this generation
        decoder.reset()
        return prefill_and_decode(decoder, tokenizer, prompt_ids, 0, options, stream)


def prefill_and_decode(
    decoder: Decoder,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    cached_tokens: int,
    options: DecodeOptions,
    stream: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> GenerationResult:
    """The generation loop of ``generate`` and ``ChatSession``: the cache holds the first
    ``cached_tokens`` prompt ids; prefill the rest, then sample, detokenize, stream and stop.
    ``cancelled()`` is asked before every decode step; True ends the generation there."""
    eos_ids = set(decoder.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    rng = np.random.default_rng(options.seed)
    stops = options.stops
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

    generated: list[int] = []
    text = emitted = ""
    finish_reason = "length"
    steps = 0
    decode_start = time.perf_counter()
    while len(generated) < options.max_new_tokens:
        previous = [*prompt_ids, *generated] if options.sampling.repeat_penalty != 1.0 else ()
        token = sample(logits if bias is None else logits + bias, options.sampling, rng, previous)
        if token in eos_ids:
            finish_reason = "eos"
            break
        generated.append(token)
        new_text = tokenizer.decode(generated, skip_special_tokens=True)
        hit = _first_stop(new_text, stops, options.stop_at)
        if hit is not None:
            new_text = new_text[:hit]
            finish_reason = "stop"
        text = new_text
        emitted = _emit(stream, emitted, _settled(text, stops))
        if finish_reason == "stop":
            break
        if len(generated) == options.max_new_tokens or decoder.position >= decoder.max_seq_len:
            break
        if cancelled is not None and cancelled():
            finish_reason = "cancelled"
            break
        logits = decoder.step(token)
        steps += 1
    decode_s = time.perf_counter() - decode_start
    _emit(stream, emitted, text)
    return GenerationResult(
        text=text,
        token_ids=generated,
        prompt_tokens=len(prompt_ids),
        finish_reason=finish_reason,
        prefill_ms=prefill_ms,
        decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else 0.0,
        cached_tokens=cached_tokens,
    )


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
