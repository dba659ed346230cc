"""OpenAI-shaped response bodies and stream chunks of both completion endpoints."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from ..runtime.generate import GenerationResult

# generate's finish reasons as OpenAI names them: an end-of-sequence token is a "stop" too.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
DONE = "data: [DONE]\n\n"


@dataclasses.dataclass(frozen=True)
class Completion:
    """The identity of one response: its chunks share id, created and model."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, chat: bool, model: str) -> Completion:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def body(self, result: GenerationResult) -> dict[str, Any]:
        finish = FINISH_REASONS.get(result.finish_reason, result.finish_reason)
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                                      "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None,
                      "text": result.text}
        return {**self._head(False), "choices": [choice], "usage": usage(result)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None,
              first: bool = False) -> str:
        """One ``data:`` event: a piece of text, the final finish reason, or (chat) the
        opening assistant role."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {} if text is None else {"content": text})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
        choice["finish_reason"] = None if finish_reason is None else FINISH_REASONS.get(
            finish_reason, finish_reason)
        return sse({**self._head(True), "choices": [choice]})

    def usage_chunk(self, result: GenerationResult) -> str:
        """The last chunk of ``stream_options.include_usage``: no choices, the usage."""
        return sse({**self._head(True), "choices": [], "usage": usage(result)})

    def _head(self, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            kind = "text_completion"  # its stream chunks too
        else:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(result: GenerationResult) -> dict[str, Any]:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
