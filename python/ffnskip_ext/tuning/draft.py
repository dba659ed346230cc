"""A self draft tuned for speed: the skip policy whose drafts, verified by the dense model,
decode fastest on this machine (``ffnskip calibrate --for speculation``).

The procedure is ours (SWIFT searches on the fly, Draft & Verify by Bayesian optimisation):
1. costs, timed on this machine: a dense step, one attention and one FFN sub-block (from steps
   without every attention or every FFN), and a verify pass of 1 .. max_draft + 1 tokens;
2. the dense greedy continuations of the calibration prompts;
3. for every sub-block alone, the draft's *agreement*: the share of positions whose one-step
   draft (after the dense context) predicts the dense token, measured with one dense prefill of
   the whole continuation and draft steps from its end backwards (each step then reads only
   dense K/V);
4. sub-blocks ordered by agreement lost per second saved; nested sets of the cheapest form
   ``SubBlockSkip`` candidates, joined by FFN-SkipLLM drafts; each is scored by the speed a
   draft of per-token acceptance a (its agreement) predicts, max over draft lengths k of
   (1 + a + .. + a^k) / (k draft steps + a verify pass of k + 1 tokens), against a dense step;
5. the best predicted candidates run real speculative generation on the prompts, interleaved
   with plain decoding; the fastest measured one wins.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..runtime.decoder import Decoder
from ..runtime.generate import Message, generate
from ..runtime.policies import DensePolicy, FFNSkipPolicy, Policy, SubBlockSkip
from ..runtime.speculative import MAX_DRAFT_LIMIT, Speculative
from .calibration import Reference, dense_references

DEFAULT_TOKENS = 32  # generated per calibration prompt


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds on this machine, at the calibration prompts' context lengths."""

    step: float  # a dense decode step
    attention: float  # one attention sub-block of a decode step
    ffn: float  # one FFN sub-block of a decode step
    verify: tuple[float, ...]  # verify[n - 1]: a verify pass of n tokens (verify[0]: a step)

    def draft_step(self, policy: SubBlockSkip) -> float:
        saved = len(policy.attention) * self.attention + len(policy.ffn) * self.ffn
        return max(self.step - saved, 0.05 * self.step)


@dataclasses.dataclass(frozen=True)
class DraftCandidate:
    policy: Policy
    agreement: float  # one-step draft predicts the dense greedy token
    draft_seconds: float  # a draft step (modelled for sub-block sets, timed otherwise)
    max_draft: int  # the draft length the speed model prefers
    predicted_speedup: float  # over dense decode steps


@dataclasses.dataclass(frozen=True)
class DraftCalibration:
    policy: Policy
    max_draft: int
    measured_speedup: float  # speculative tok/s over plain tok/s on the calibration prompts
    predicted_speedup: float
    agreement: float
    costs: Costs
    candidates: tuple[DraftCandidate, ...]  # every candidate scored, best predicted first


def _median_seconds(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def measure_costs(decoder: Decoder, context: Sequence[int], max_draft: int,
                  repeats: int = 5) -> Costs:
    """Times a dense step, draft steps without every attention / every FFN sub-block, and
    verify passes of 1 .. max_draft + 1 tokens, each after ``context`` (dense prefill)."""
    layers = decoder.config.num_layers
    everything = tuple(range(layers))
    decoder.reset()
    decoder.prefill(list(context))
    position = decoder.position
    token = int(context[-1])

    def timed(run: Any) -> float:
        def once() -> None:
            run()
            decoder.truncate(position)
        once()  # warm: first touches of the pages and caches
        return _median_seconds(once, repeats)

    step = timed(lambda: decoder.step(token))
    per_block = {}
    for name, policy in (("attention", SubBlockSkip(attention=everything)),
                         ("ffn", SubBlockSkip(ffn=everything))):
        decoder.set_draft_policy(policy)
        per_block[name] = max(step - timed(lambda: decoder.draft_step(token)), 0.0) / layers
    verify = [step] + [timed(lambda n=n: decoder.verify([token] * n))
                       for n in range(2, max_draft + 2)]
    decoder.reset()
    return Costs(step, per_block["attention"], per_block["ffn"], tuple(verify))


def draft_agreement(decoder: Decoder, policy: Policy, refs: Sequence[Reference],
                    positions: int | None = None) -> tuple[float, float]:
    """Share of positions where one draft step after the dense context predicts the dense
    greedy token, and the mean seconds of a draft step; over at most ``positions`` positions
    (spread over the references). The decoder's policy must be dense."""
    decoder.set_draft_policy(policy)
    budget = positions if positions is not None else sum(len(r.tokens) for r in refs)
    per_ref = max(1, budget // len(refs))
    agree = total = 0
    seconds = 0.0
    for ref in refs:
        tokens = ref.tokens[:per_ref]
        sequence = ref.prompt + tokens
        decoder.reset()
        decoder.prefill(sequence[:-1])
        # Backwards: the step at position p overwrites p's K/V, which no earlier step reads.
        for i in range(len(tokens) - 1, -1, -1):
            position = len(ref.prompt) + i - 1
            decoder.truncate(position)
            began = time.perf_counter()
            logits = decoder.draft_step(sequence[position])
            seconds += time.perf_counter() - began
            agree += int(np.argmax(logits)) == tokens[i]
            total += 1
    decoder.reset()
    return agree / total, seconds / total


def predicted_speedup(agreement: float, draft_seconds: float, costs: Costs,
                      max_draft: int) -> tuple[float, int]:
    """The speed model's best speedup over dense steps (below 1: the draft does not pay) and
    the draft length reaching it."""
    def speedup(k: int) -> float:
        tokens = sum(agreement ** i for i in range(k + 1))
        return tokens / (k * draft_seconds + costs.verify[k]) * costs.step

    best_k = max(range(1, max_draft + 1), key=speedup)
    return speedup(best_k), best_k


def _speculative_speed(decoder: Decoder, tokenizer: Any, prompts: Sequence[Any],
                       max_new_tokens: int, spec: Speculative | None) -> float:
    tokens = 0
    seconds = 0.0
    for prompt in prompts:
        result = generate(decoder, tokenizer, prompt, max_new_tokens=max_new_tokens,
                          speculative=spec)
        tokens += len(result.token_ids)
        if result.decode_tokens_per_s > 0:
            seconds += len(result.token_ids) / result.decode_tokens_per_s
    return tokens / seconds if seconds > 0 else 0.0


def calibrate_draft(
    decoder: Decoder,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[Message]],
    *,
    max_new_tokens: int = DEFAULT_TOKENS,
    max_draft: int = 8,
    positions: int = 64,
    confirm: int = 3,
    rounds: int = 2,
    progress: bool = True,
) -> DraftCalibration:
    """The self-draft policy (``SubBlockSkip`` or ``FFNSkipPolicy``) and draft length whose
    speculative decoding, verified by the dense model, measured fastest on ``prompts``
    (see the module's procedure). ``positions`` bounds the agreement measurements,
    ``confirm`` the candidates measured end to end, ``rounds`` their interleaved runs. A
    measured speedup below 1 means no draft pays on this machine: plain decoding is faster."""
    check_draft_arguments(max_new_tokens, max_draft, positions, confirm, rounds)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if not isinstance(decoder.policy, DensePolicy):
        raise ValueError(f"calibrate_draft tunes a draft for a dense decoder; the decoder's "
                         f"policy is {type(decoder.policy).__name__}")
    previous_draft = decoder.draft_policy
    try:
        refs = dense_references(decoder, tokenizer, prompts, max_new_tokens, progress)
        context = refs[0].prompt + refs[0].tokens
        costs = measure_costs(decoder, context, max_draft)
        layers = decoder.config.num_layers
        blocks = [(kind, layer) for kind in ("attention", "ffn") for layer in range(layers)]
        lost = {}
        for kind, layer in tqdm(blocks, desc="sub-blocks", disable=not progress):
            policy = SubBlockSkip(**{kind: (layer,)})
            lost[kind, layer] = 1.0 - draft_agreement(decoder, policy, refs, positions)[0]
        block_cost = {"attention": costs.attention, "ffn": costs.ffn}
        order = sorted(blocks, key=lambda b: lost[b] / max(block_cost[b[0]], 1e-12))
        candidates = []

        def score(policy: Policy, modelled: bool) -> None:
            agreement, seconds = draft_agreement(decoder, policy, refs, positions)
            if modelled:
                seconds = costs.draft_step(policy)  # type: ignore[arg-type]
            speedup, k = predicted_speedup(agreement, seconds, costs, max_draft)
            candidates.append(DraftCandidate(policy, agreement, seconds, k, speedup))

        sizes = sorted({max(1, round(f * len(blocks))) for f in
                        (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)})
        adaptive = [FFNSkipPolicy(threshold=t, warmup_tokens=0, full_token_interval=0,
                                  max_skips_per_token=k)
                    for t, k in ((0.95, None), (0.9, None), (0.95, max(1, layers // 4)))]
        work = [(_sub_block_set(order[:m]), True) for m in sizes] + [(p, False) for p in adaptive]
        for policy, modelled in tqdm(work, desc="candidates", disable=not progress):
            score(policy, modelled)
        candidates.sort(key=lambda c: -c.predicted_speedup)
        shortlist = candidates[:confirm]
        decoder.set_policy(DensePolicy())
        plain, fast = [], {i: [] for i in range(len(shortlist))}
        for _ in tqdm(range(rounds), desc="measuring", disable=not progress):
            plain.append(_speculative_speed(decoder, tokenizer, prompts, max_new_tokens, None))
            for i, c in enumerate(shortlist):
                spec = Speculative(draft="self", draft_policy=c.policy, max_draft=c.max_draft)
                fast[i].append(_speculative_speed(decoder, tokenizer, prompts, max_new_tokens,
                                                  spec))
        base = float(np.median(plain))
        measured = {i: float(np.median(v)) / base for i, v in fast.items()}
        best = max(measured, key=measured.__getitem__)
    finally:
        decoder.reset()
        decoder.set_draft_policy(previous_draft)
    chosen = shortlist[best]
    return DraftCalibration(chosen.policy, chosen.max_draft, measured[best],
                            chosen.predicted_speedup, chosen.agreement, costs,
                            tuple(candidates))


def check_draft_arguments(max_new_tokens: int, max_draft: int, positions: int = 64,
                          confirm: int = 3, rounds: int = 2) -> None:
    """The checks calibrate_draft() makes before any work (the CLI makes them before loading
    the model)."""
    for name, value, low, high in (("max_new_tokens", max_new_tokens, 2, 1 << 20),
                                   ("max_draft", max_draft, 1, MAX_DRAFT_LIMIT),
                                   ("positions", positions, 1, 1 << 20),
                                   ("confirm", confirm, 1, 64), ("rounds", rounds, 1, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _sub_block_set(blocks: Sequence[tuple[str, int]]) -> SubBlockSkip:
    return SubBlockSkip(attention=tuple(i for kind, i in blocks if kind == "attention"),
                        ffn=tuple(i for kind, i in blocks if kind == "ffn"))
