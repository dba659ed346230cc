"""Lossless speculative decoding: cheap drafts, verified by the decoder's own policy.

A round takes the next token (already chosen), drafts up to k tokens after it, runs the
policy over the token and its draft in one ``Decoder.verify`` pass and keeps the longest
draft prefix the policy agrees with, plus the policy's own next token. Greedy: a draft token
is kept when it is the policy's argmax, so the output is token for token that of plain greedy
decoding. Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023): keep a draft
token d with probability min(1, p(d) / q(d)), else sample the next token from max(0, p - q)
normalised, where p and q are the policy's and the draft's distributions under the same
temperature, top-k and top-p (``sampling.probabilities``); the output has the policy's
distribution. Drafts come from

- ``ngram`` (prompt lookup): the longest suffix of the context (n = ``ngram_max`` ..
  ``ngram_min`` tokens, default 3 .. 2) found earlier in the prompt and output proposes the
  tokens that followed it (q is a point mass). One-token matches are off by default: on the
  1.5B they were accepted 4-44% of the time and made QA and chat slower than plain decoding
  (benchmarks/results/speculative_qwen2.5-coder-1.5b_2026-12-01.md);
- ``self``: the same model under a skip policy (``Decoder.set_draft_policy``; draft steps run
  on the same cache, and the verify pass overwrites their K/V);
- ``auto``: the n-gram draft when it has a match, else the self draft.

The draft length adapts: a self draft stops when its top-1 probability falls below
``min_draft_prob``; the round's limit grows by 2 after a fully accepted draft and shrinks by
1 after a rejection, within 1 .. ``max_draft``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .decoder import Decoder
from .policies import FFNSkipPolicy, Policy, policy_from_dict
from .sampling import SamplingParams, probabilities

if TYPE_CHECKING:
    from .generate import DecodeOptions, Transcript

DRAFT_SOURCES = ("ngram", "self", "auto")
MAX_DRAFT_LIMIT = 64  # the engine verifies at most 65 tokens (the round's token and its draft)


def default_draft_policy() -> Policy:
    """FFN-SkipLLM from the first decode token, without dense refresh tokens: a draft needs
    speed; the policy's verification keeps the output."""
    return FFNSkipPolicy(warmup_tokens=0, full_token_interval=0)


@dataclasses.dataclass(frozen=True)
class Speculative:
    """How to draft. ``draft_policy`` (self and auto drafts; None: ``default_draft_policy``)
    is any skip policy; ``max_draft`` caps the tokens drafted per round (1..64)."""

    draft: str = "auto"
    draft_policy: Policy | None = None
    max_draft: int = 8
    ngram_max: int = 3
    ngram_min: int = 2
    min_draft_prob: float = 0.3
    adaptive: bool = True  # grow / shrink the round's draft limit with the acceptance

    def __post_init__(self) -> None:
        if self.draft not in DRAFT_SOURCES:
            raise ValueError(f"unknown speculative draft {self.draft!r} (expected one of "
                             f"{', '.join(DRAFT_SOURCES)})")
        if self.draft_policy is not None and not isinstance(self.draft_policy, Policy):
            raise ValueError(
                f"draft_policy must be a Policy, got {type(self.draft_policy).__name__}")
        for name, value, low, high in (("max_draft", self.max_draft, 1, MAX_DRAFT_LIMIT),
                                       ("ngram_max", self.ngram_max, 1, 64)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if isinstance(self.ngram_min, bool) or not isinstance(self.ngram_min, int) \
                or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_min must be an integer in [1, ngram_max={self.ngram_max}], "
                             f"got {self.ngram_min!r} (the default is 2: give ngram_min=1 "
                             "with ngram_max=1)")
        if not (isinstance(self.min_draft_prob, (int, float))
                and 0.0 <= self.min_draft_prob < 1.0):
            raise ValueError(f"min_draft_prob must be in [0, 1), got {self.min_draft_prob!r}")

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.draft_policy is not None:
            fields["draft_policy"] = self.draft_policy.to_dict()
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Speculative:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))}: unknown speculative field(s)")
        fields = dict(data)
        if fields.get("draft_policy") is not None:
            fields["draft_policy"] = policy_from_dict(fields["draft_policy"])
        return cls(**fields)

    @property
    def uses_model(self) -> bool:
        return self.draft in ("self", "auto")

    @property
    def policy(self) -> Policy:
        return self.draft_policy if self.draft_policy is not None else default_draft_policy()


@dataclasses.dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of them, kept
    verify_passes: int = 0
    ngram_rounds: int = 0  # verify passes whose draft came from the n-gram lookup
    self_rounds: int = 0  # ... from the self draft
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Draft tokens kept per verify pass (each pass also adds the policy's own token)."""
        return self.accepted / self.verify_passes if self.verify_passes else 0.0


def resolve_speculative(speculative: str | Speculative | None) -> Speculative | None:
    """None, a draft source name or a ``Speculative``; anything else is a ValueError."""
    if speculative is None or isinstance(speculative, Speculative):
        return speculative
    if isinstance(speculative, str):
        return Speculative(draft=speculative)
    raise ValueError(f"speculative must be None, {', '.join(map(repr, DRAFT_SOURCES))} or a "
                     f"Speculative, got {speculative!r}")


def prepare_speculation(decoder: Decoder, spec: Speculative) -> None:
    """Checks that the policy can verify and applies the draft policy; before the cache is
    touched (a FiRST draft routes on the prefill). Raises ValueError with the decoder
    unchanged."""
    if not decoder.verifies:
        raise ValueError(f"speculative decoding verifies with the decoder's policy, which must "
                         f"decide nothing per token; {type(decoder.policy).__name__} does")
    if spec.uses_model and decoder.draft_policy != spec.policy:
        decoder.set_draft_policy(spec.policy)


def ngram_draft(context: np.ndarray, ngram_max: int, limit: int, ngram_min: int = 1) -> list[int]:
    """Prompt lookup: for n = ngram_max .. ngram_min, the last occurrence before the end of
    the context's last n tokens proposes up to ``limit`` tokens that followed it."""
    length = context.size
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
        matches = np.flatnonzero((windows == context[length - n:]).all(axis=1))
        if matches.size:
            start = int(matches[-1]) + n
            return [int(t) for t in context[start:start + limit]]
    return []


class Acceptance:
    """The policy's side of a round: its token at a position (argmax, or drawn from its
    distribution) and the acceptance rule for a draft."""

    def __init__(self, sampling: SamplingParams, bias: np.ndarray | None,
                 rng: np.random.Generator) -> None:
        self.greedy = sampling.temperature == 0.0
        self._sampling, self._bias, self._rng = sampling, bias, rng

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        return probabilities(self._biased(logits), self._sampling)

    def pick(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(self._biased(logits)))
        return self.draw(self.distribution(logits))

    def draw(self, probs: np.ndarray) -> int:
        return int(self._rng.choice(probs.size, p=probs))

    def accept(self, rows: np.ndarray, draft: list[int],
               draft_probs: list[np.ndarray] | None) -> tuple[int, int]:
        """Draft tokens kept and the token after them. ``rows[i]`` are the policy's logits
        for draft[i]'s position; ``draft_probs`` None: the draft is a point mass (n-gram)."""
        for i, token in enumerate(draft):
            if self.greedy:
                best = int(np.argmax(self._biased(rows[i])))
                if best != token:
                    return i, best
                continue
            p = self.distribution(rows[i])
            q = None if draft_probs is None else draft_probs[i]
            q_token = 1.0 if q is None else q[token]
            if self._rng.random() < min(1.0, p[token] / q_token):
                continue
            residual = p.copy()
            if q is None:
                residual[token] = 0.0
            else:
                residual = np.maximum(p - q, 0.0)
            total = residual.sum()
            return i, self.draw(residual / total if total > 0 else p)
        return len(draft), self.pick(rows[len(draft)])

    def _biased(self, logits: np.ndarray) -> np.ndarray:
        return logits if self._bias is None else logits + self._bias


class _SelfDraft:
    """Draft steps of the decoder under its draft policy, from the round's token on."""

    def __init__(self, decoder: Decoder, rule: Acceptance, min_prob: float) -> None:
        self._decoder, self._rule, self._min_prob = decoder, rule, min_prob

    def propose(self, token: int, limit: int) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to ``limit`` tokens after ``token`` and, when sampling, the distributions they
        were drawn from. Leaves the draft steps in the cache (the caller truncates)."""
        draft: list[int] = []
        probs: list[np.ndarray] = []
        while len(draft) < limit:
            logits = self._decoder.draft_step(draft[-1] if draft else token)
            if self._rule.greedy:
                shifted = np.exp(logits - logits.max(), dtype=np.float64)
                confidence = 1.0 / shifted.sum()
                choice = int(np.argmax(logits))
            else:
                q = self._rule.distribution(logits)
                confidence = float(q.max())
                choice = self._rule.draw(q)
                probs.append(q)
            if confidence < self._min_prob:
                probs = probs[: len(draft)]
                break
            draft.append(choice)
        return draft, None if self._rule.greedy else probs


def speculative_decode(decoder: Decoder, spec: Speculative, prompt_ids: Sequence[int],
                       logits: np.ndarray, transcript: Transcript, options: DecodeOptions,
                       bias: np.ndarray | None, rng: np.random.Generator,
                       cancelled: Callable[[], bool] | None) -> SpeculativeStats:
    """The decode loop of ``prefill_and_decode`` with drafts; ``logits`` are the prefill's.
    Ends with the cache plain decoding would hold (``Transcript.cache_tokens``)."""
    stats = SpeculativeStats()
    rule = Acceptance(options.sampling, bias, rng)
    self_draft = _SelfDraft(decoder, rule, spec.min_draft_prob) if spec.uses_model else None
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    limit = min(spec.max_draft, 4) if spec.adaptive else spec.max_draft
    token = rule.pick(logits) if not transcript.done else -1
    while not transcript.done and not transcript.push(token):
        if cancelled is not None and cancelled():
            transcript.cancel()
            break
        position = decoder.position  # the context but `token`
        room = min(limit, decoder.max_seq_len - position - 1,
                   options.max_new_tokens - len(transcript.tokens))
        draft: list[int] = []
        draft_probs: list[np.ndarray] | None = None
        began = time.perf_counter()
        if room > 0 and spec.draft in ("ngram", "auto"):
            context = np.concatenate([prompt, np.asarray(transcript.tokens, dtype=np.int64)])
            draft = ngram_draft(context, spec.ngram_max, room, spec.ngram_min)
            stats.ngram_rounds += bool(draft)
        if room > 0 and not draft and self_draft is not None:
            draft, draft_probs = self_draft.propose(token, room)
            decoder.truncate(position)
            stats.self_rounds += bool(draft)
        verified = time.perf_counter()
        # Without a draft a step is the same pass (bit for bit) and, on CUDA, a graph replay.
        rows = decoder.verify([token, *draft]) if draft else decoder.step(token)[None]
        kept, token = rule.accept(rows, draft, draft_probs)
        decoder.truncate(position + 1 + kept)
        stats.draft_seconds += verified - began
        stats.verify_seconds += time.perf_counter() - verified
        stats.verify_passes += 1
        stats.drafted += len(draft)
        stats.accepted += kept
        if spec.adaptive and draft:
            limit = min(spec.max_draft, limit + 2) if kept == len(draft) else max(1, limit - 1)
        if any(transcript.push(t) for t in draft[:kept]):
            break
    decoder.truncate(transcript.cache_tokens)
    return stats
