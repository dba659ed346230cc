"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions``, checked field by field.

Every problem is an ``APIError`` 400 naming the field (``param``); fields this server does
not implement are refused when they ask for something (``logprobs: true``) and accepted at
their neutral value, so that clients sending defaults work. Unknown fields are ignored, as
the OpenAI API does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from jinja2 import TemplateError

from ..runtime.generate import Message, encode_prompt
from .errors import bad_request

MAX_STOP_STRINGS = 4  # as the OpenAI API
MAX_TEMPERATURE = 2.0
MAX_LOGIT_BIAS = 100.0
DEFAULT_COMPLETION_TOKENS = 16  # the OpenAI default of /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Field -> the values that ask for nothing (accepted, ignored).
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A checked request; ``prompt`` is chat messages (chat) or a string or token ids."""

    chat: bool
    prompt: list[Message] | str | list[int]
    max_tokens: int | None  # None: the endpoint's default
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logit_bias: dict[int, float]
    policy: str | dict[str, Any] | None  # "ffnskip": {"policy": ...} as sent
    speculative: str | None  # "ffnskip": {"speculative": ...}: a mode, "none", or None (default)


def parse_json(raw: bytes) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {e}", None,
                          "invalid_json") from e


def parse_request(body: Any, chat: bool, model_name: str, vocab_size: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = _required(body, "model", str)
    if model != model_name:
        raise bad_request(f"model {model!r} is not served here (this server serves "
                          f"{model_name!r})", "model", "model_not_found")
    for name, neutral in UNSUPPORTED.items():
        if name in body and not any(_same(body[name], v) for v in neutral):
            raise bad_request(f"{name} is not supported by this server", name, "unsupported")
    n = _optional(body, "n", int)
    if n not in (None, 1):
        raise bad_request("n: only one choice per request is supported", "n")
    prompt = _messages(body) if chat else _prompt(body, vocab_size)
    max_tokens = _max_tokens(body)
    temperature = _optional(body, "temperature", float)
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad_request(f"temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}",
                          "temperature")
    top_p = _optional(body, "top_p", float)
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _optional(body, "top_k", int)  # not OpenAI's; as vLLM and llama.cpp servers
    if top_k is not None and top_k < 0:
        raise bad_request(f"top_k must be >= 0, got {top_k}", "top_k")
    seed = _optional(body, "seed", int)
    if seed is not None and not 0 <= seed < 2**64:
        raise bad_request(f"seed must be in [0, 2**64), got {seed}", "seed")
    stream = _optional(body, "stream", bool) or False
    return CompletionRequest(
        chat=chat, prompt=prompt, max_tokens=max_tokens,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p), top_k=top_k or 0, seed=seed,
        stop=_stop(body), stream=stream, include_usage=_include_usage(body, stream),
        logit_bias=_logit_bias(body, vocab_size), policy=_policy(body),
        speculative=_speculative(body),
    )


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    max_tokens: int


def prepare_prompt(request: CompletionRequest, tokenizer: Any,
                   max_seq_len: int) -> PreparedPrompt:
    """The prompt's token ids and the number of tokens to generate, checked against the
    context: the prompt and ``max_tokens`` must fit in ``max_seq_len`` together."""
    param = "messages" if request.chat else "prompt"
    if not request.chat and isinstance(request.prompt, list):
        ids: list[int] = request.prompt  # type: ignore[assignment]
    else:
        try:
            ids = encode_prompt(tokenizer, request.prompt)  # type: ignore[arg-type]
        except (TemplateError, ValueError, TypeError) as e:  # a template may refuse a chat
            raise bad_request(f"{param}: the chat template refused them: {e}", param) from e
    if not ids:
        raise bad_request(f"{param}: the prompt encodes to no tokens", param)
    room = max_seq_len - len(ids)
    if room < 1:
        raise bad_request(f"the prompt has {len(ids)} tokens; the context holds {max_seq_len} "
                          f"with at least 1 to generate", param, "context_length_exceeded")
    if request.max_tokens is None:
        max_tokens = room if request.chat else min(DEFAULT_COMPLETION_TOKENS, room)
    elif request.max_tokens > room:
        raise bad_request(f"max_tokens {request.max_tokens} with a prompt of {len(ids)} tokens "
                          f"exceeds the context of {max_seq_len} tokens", "max_tokens",
                          "context_length_exceeded")
    else:
        max_tokens = request.max_tokens
    return PreparedPrompt(ids, max_tokens)


def _same(value: Any, neutral: Any) -> bool:
    # In Python True == 1 and False == 0: a boolean matches only a boolean.
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "an object"}[kind]


def _check_type(name: str, value: Any, kind: type) -> Any:
    if kind is float:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok or (kind in (int, float) and isinstance(value, bool)):
        raise bad_request(f"{name} must be {_type_name(kind)}, got {json.dumps(value)}", name,
                          "invalid_type")
    return value


def _required(body: dict[str, Any], name: str, kind: type) -> Any:
    if body.get(name) is None:
        raise bad_request(f"{name} is required", name, "missing_required_parameter")
    return _check_type(name, body[name], kind)


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    return None if value is None else _check_type(name, value, kind)


def _messages(body: dict[str, Any]) -> list[Message]:
    messages = _required(body, "messages", list)
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", where, "invalid_type")
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request(f"{where}.role must be a string", f"{where}.role",
                              "invalid_type")
        if role not in ROLES:
            raise bad_request(f"{where}.role {role!r} is not supported (one of "
                              f"{', '.join(ROLES)})", f"{where}.role")
        out.append({"role": ROLES[role], "content": _content(message.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    """A string, or text parts ``[{"type": "text", "text": ...}]`` joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content[{j}]: only text parts are supported",
                                  f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}.content must be a string or a list of text parts",
                      f"{where}.content", "invalid_type")


def _prompt(body: dict[str, Any], vocab_size: int) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab_size})",
                              "prompt")
        return prompt
    if prompt is None:
        raise bad_request("prompt is required", "prompt", "missing_required_parameter")
    raise bad_request("prompt must be a string or a non-empty array of token ids (one prompt "
                      "per request)", "prompt", "invalid_type")


def _max_tokens(body: dict[str, Any]) -> int | None:
    values = {name: _optional(body, name, int)
              for name in ("max_completion_tokens", "max_tokens")}
    for name, value in values.items():
        if value is not None and value < 1:
            raise bad_request(f"{name} must be >= 1, got {value}", name)
    given = {v for v in values.values() if v is not None}
    if len(given) > 1:
        raise bad_request("max_tokens and max_completion_tokens differ; give one",
                          "max_tokens")
    return next(iter(given), None)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or an array of strings", "stop",
                          "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if not all(stops):
        raise bad_request("stop strings must not be empty", "stop")
    return tuple(stops)


def _logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float]:
    """``{"token id": bias}``, bias in [-100, 100] (JSON keys are strings)."""
    given = _optional(body, "logit_bias", dict) or {}
    bias = {}
    for key, value in given.items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias: {key!r} is not a token id in [0, {vocab_size})",
                              "logit_bias")
        _check_type(f"logit_bias[{key}]", value, float)
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias[{key}] must be in [-100, 100], got {value}",
                              "logit_bias")
        bias[token] = float(value)
    return bias


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = _optional(body, "stream_options", dict)
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options needs stream: true", "stream_options")
    return bool(_optional(options, "include_usage", bool))


def _policy(body: dict[str, Any]) -> str | dict[str, Any] | None:
    extension = _optional(body, "ffnskip", dict)
    if extension is None:
        return None
    unknown = set(extension) - {"policy", "speculative"}
    if unknown:
        raise bad_request(f"ffnskip: unknown field(s) {', '.join(sorted(unknown))}", "ffnskip")
    policy = extension.get("policy")
    if policy is not None and not isinstance(policy, (str, dict)):
        raise bad_request("ffnskip.policy must be a policy name or a policy object",
                          "ffnskip.policy", "invalid_type")
    return policy



SPECULATIVE_MODES = ("ngram", "self", "auto", "none")


def _speculative(body: dict[str, Any]) -> str | None:
    extension = _optional(body, "ffnskip", dict) or {}
    mode = extension.get("speculative")
    if mode is not None and mode not in SPECULATIVE_MODES:
        raise bad_request(f"ffnskip.speculative must be one of {', '.join(SPECULATIVE_MODES)}, "
                          f"got {mode!r}", "ffnskip.speculative")
    return mode
