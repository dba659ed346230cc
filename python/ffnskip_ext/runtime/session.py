"""A decoder that remembers what its KV cache holds and reuses it for the next prompt.

``ChatSession.generate`` keeps the cache of the longest common prefix of the last sequence
and the new prompt and prefills only the rest: turn n + 1 of a chat starts with turn n's
prompt and answer, so only the new message is computed again. The decode loop is
``generate``'s (``prefill_and_decode``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .decoder import Decoder
from .generate import (
    DecodeOptions,
    GenerationResult,
    Message,
    check_prompt_fits,
    encode_prompt,
    prefill_and_decode,
    speculation_for,
)
from .policies import Policy
from .speculative import Speculative, prepare_speculation

# Policies whose decode steps write the same K/V as a prefill of the same tokens (to float
# rounding), so that generated tokens can be reused as prompt. The others skip work in
# decode steps only (FFN skips, early exit): their cache keeps just the prefilled prompt.
_DECODE_WRITES_PREFILL_KV = frozenset({"dense", "layer_drop", "first"})


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """One decoder and the token ids of its cache, for generations one after another.

    The session owns its decoder: calls made on the decoder directly are noticed through its
    position only, and then the next generation starts from an empty cache. A policy change
    (``set_policy``, or on the decoder) empties the cache too. Under FiRST the reused cache
    keeps the routing of the sequence's first prompt (a fresh prefill would route the whole
    new prompt); a cache reused under any other policy gives what a fresh prefill gives.
    Calls from several threads are serialised: each generation, reset and policy change owns
    the decoder (``Decoder.exclusive()``) while it runs.
    """

    def __init__(self, decoder: Decoder, tokenizer: Any) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self._tokens: list[int] = []  # ids of the cache's first positions, reusable as prompt
        self._position = -1  # decoder.position after the session's last call; -1: unknown
        self._policy: Policy | None = None  # the policy the cached K/V were computed under

    @property
    def cached_ids(self) -> list[int]:
        """Token ids a following prompt can reuse (a prefix of what the cache holds)."""
        return list(self._tokens) if self._valid() else []

    def reusable_tokens(self, prompt_ids: Sequence[int]) -> int:
        """How many of ``prompt_ids`` ``generate`` would take from the cache: the common
        prefix, less one when it is the whole prompt (the last prompt token is fed again, for
        its logits)."""
        if not self._valid() or not prompt_ids:
            return 0
        return min(common_prefix(self._tokens, prompt_ids), len(prompt_ids) - 1)

    def reset(self) -> None:
        with self.decoder.exclusive():
            self.decoder.reset()
            self._tokens = []
            self._position = self.decoder.position

    def set_policy(self, policy: Policy) -> None:
        """Apply ``policy`` to later generations; a different one empties the cache first
        (the decoder refuses to leave FiRST mid-sequence)."""
        with self.decoder.exclusive():
            if policy == self.decoder.policy:
                return
            self.reset()
            self.decoder.set_policy(policy)

    def generate(
        self,
        prompt: str | Sequence[Message] | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: Callable[[str], None] | None = None,
        stop_at: Callable[[str], int | None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        logit_bias: Mapping[int, float] | None = None,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        speculative: str | Speculative | None = None,
    ) -> GenerationResult:
        """As ``ffnskip_ext.generate``, reusing the cache: ``prompt`` is a string, chat
        messages or token ids; ``result.cached_tokens`` says how many prompt tokens were not
        computed again. ``cancelled()`` is asked before every decode step (finish_reason
        "cancelled"); ``logit_bias`` adds to the logits of token ids before sampling;
        ``speculative`` drafts and verifies as in ``generate`` (the cache ends as without)."""
        options = DecodeOptions.make(max_new_tokens, temperature, top_k, top_p, seed, stop,
                                     stop_at, logit_bias, min_p, repeat_penalty)
        spec = speculation_for(speculative, options)
        prompt_ids = _prompt_ids(self.tokenizer, prompt)
        check_prompt_fits(self.decoder, len(prompt_ids))
        with self.decoder.exclusive():
            return self._generate(prompt_ids, options, stream, cancelled, spec)

    def _generate(self, prompt_ids: list[int], options: DecodeOptions,
                  stream: Callable[[str], None] | None,
                  cancelled: Callable[[], bool] | None,
                  spec: Speculative | None) -> GenerationResult:
        cached = self.reusable_tokens(prompt_ids)
        if spec is not None:
            prepare_speculation(self.decoder, spec)
        try:
            if cached:
                self.decoder.truncate(cached)
            else:
                self.decoder.reset()
            # Forget the cache first: an exception below leaves it unknown.
            self._tokens, self._position = [], -1
            result = prefill_and_decode(self.decoder, self.tokenizer, prompt_ids, cached,
                                        options, stream, cancelled, spec)
        except BaseException:
            self._tokens, self._position = [], -1
            raise
        policy = self.decoder.policy
        kept = prompt_ids
        if policy.kind in _DECODE_WRITES_PREFILL_KV:
            # The last sampled token is never fed back: the cache ends at decoder.position.
            kept = (prompt_ids + result.token_ids)[: self.decoder.position]
        self._tokens = kept
        self._position = self.decoder.position
        self._policy = policy
        return result

    def _valid(self) -> bool:
        return (self._position == self.decoder.position
                and self._policy is not None and self._policy == self.decoder.policy)


def _prompt_ids(tokenizer: Any, prompt: str | Sequence[Message] | Sequence[int]) -> list[int]:
    if not isinstance(prompt, str) and len(prompt) and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]  # type: ignore[arg-type]
    return encode_prompt(tokenizer, prompt)  # type: ignore[arg-type]
