"""Calibration of FFN-SkipLLM for a target skip ratio, Block Influence for layer drop, and
FiRST router thresholds for a target layer-skip ratio.

The procedure is ours (the paper only says "calibrate"; see docs/methods.md):
1. decode the calibration prompts densely (greedy), recording every layer's score;
2. cold regions: the layers at each end whose median score is an outlier or unstable;
3. for each skip budget K, bisect the threshold on the dense scores with the engine's own
   rule (fast) to hit the target, then measure the candidate for real, teacher-forced on the
   dense tokens, refining the threshold a few times; the measured ratio counts warm-up tokens
   (docs/methods.md);
4. among candidates within ``tolerance`` of the target, return the one whose greedy choices
   agree best with the dense model.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..runtime.decoder import Decoder
from ..runtime.generate import Message, encode_prompt, generate
from ..runtime.policies import DensePolicy, FFNSkipPolicy, FiRSTPolicy, Policy, simulate_ffn_skip

DEFAULT_BUDGETS = (1, 2, 4, 8, None)


class CalibrationWarning(UserWarning):
    """calibrate() returned the closest policy, which misses the target skip ratio."""

# Used when no calibration prompts are given: varied everyday requests.
DEFAULT_PROMPTS = (
    "Tell me about the history of Rome.",
    "How do airplanes fly?",
    "Write a short poem about winter.",
    "What are the benefits of regular exercise?",
)


def read_prompts(path: str) -> list[str | list[Message]]:
    """Prompts from a file: JSON lines with "prompt" (text) or "messages" (chat), or else one
    plain-text prompt per line."""
    import json

    prompts: list[str | list[Message]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e})") from e
                if "messages" in record:
                    prompts.append(record["messages"])
                elif "prompt" in record:
                    prompts.append([{"role": "user", "content": str(record["prompt"])}])
                else:
                    raise ValueError(f'{path}:{number}: expected "prompt" or "messages"')
            else:
                prompts.append([{"role": "user", "content": line}])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


@dataclasses.dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]  # the dense model's greedy continuation
    scores: np.ndarray  # [tokens, layers] cos(a_l, x_{l+1}) of the dense run


@dataclasses.dataclass
class Candidate:
    policy: FFNSkipPolicy
    skip_ratio: float
    agreement: float  # share of steps whose argmax equals the dense token


def dense_references(
    decoder: Decoder, tokenizer: Any, prompts: Sequence[str | Sequence[Message]],
    max_new_tokens: int, progress: bool = True,
) -> list[Reference]:
    previous = decoder.policy
    decoder.reset()  # leaving a FiRST policy needs an empty cache
    decoder.set_policy(DensePolicy())
    decoder.enable_trace(True)
    refs = []
    try:
        for prompt in tqdm(prompts, desc="dense reference", disable=not progress):
            decoder.clear_trace()
            result = generate(decoder, tokenizer, prompt, max_new_tokens=max_new_tokens)
            prompt_ids = encode_prompt(tokenizer, prompt)
            if not result.token_ids or decoder.position >= decoder.max_seq_len:
                continue
            # The trace holds the steps that fed generated tokens back: score those steps,
            # plus one more so every generated token has its row.
            decoder.step(result.token_ids[-1])
            refs.append(Reference(prompt_ids, result.token_ids, decoder.trace()["score"]))
    finally:
        decoder.enable_trace(False)
        decoder.clear_trace()
        decoder.set_policy(previous)
    if not refs:
        raise ValueError("calibration prompts produced no tokens")
    return refs


def teacher_forced(decoder: Decoder, policy: Policy, refs: Sequence[Reference]) -> Candidate:
    """Skip ratio and greedy agreement of `policy` fed the dense tokens."""
    decoder.reset()
    decoder.set_policy(policy)
    decoder.reset_stats()
    agree = total = 0
    for ref in refs:
        decoder.reset()
        logits = decoder.prefill(ref.prompt)
        for token in ref.tokens:
            agree += int(np.argmax(logits)) == token
            total += 1
            logits = decoder.step(token)
    stats = decoder.stats()
    return Candidate(policy, stats.skip_ratio, agree / total)  # type: ignore[arg-type]


def cold_regions(scores: np.ndarray) -> tuple[int, int]:
    """Layers at either end whose median score is an outlier (low) or whose spread is large;
    at least one at each end (layer 0's score says little: it reshapes the embedding)."""
    median = np.nanmedian(scores, axis=0)
    spread = np.nanpercentile(scores, 75, axis=0) - np.nanpercentile(scores, 25, axis=0)
    q1, q3 = np.percentile(median, [25, 75])
    cold = (median < q1 - 1.5 * (q3 - q1)) | (spread > 3 * np.median(spread))
    layers = len(median)
    third = layers // 3
    start = max([1] + [i + 1 for i in range(third) if cold[i]])
    end = max([1] + [layers - i for i in range(layers - third, layers) if cold[i]])
    return start, end


def _simulated_ratio(policy: FFNSkipPolicy, refs: Sequence[Reference]) -> float:
    skipped = sum(int(simulate_ffn_skip(policy, r.scores).sum()) for r in refs)
    return skipped / sum(r.scores.size for r in refs)


def _bisect(
    base: FFNSkipPolicy, target: float, measure: Callable[[FFNSkipPolicy], float],
    low: float, high: float, steps: int,
) -> list[tuple[FFNSkipPolicy, float]]:
    """Bisects the threshold (the ratio falls as it rises) towards measure(policy) = target;
    returns every (policy, ratio) measured."""
    measured = []
    for _ in range(steps):
        policy = dataclasses.replace(base, threshold=(low + high) / 2)
        ratio = measure(policy)
        measured.append((policy, ratio))
        low, high = (policy.threshold, high) if ratio > target else (low, policy.threshold)
    return measured


def calibrate(
    decoder: Decoder,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[Message]],
    target_skip_ratio: float,
    *,
    max_new_tokens: int = 64,
    warmup_tokens: int = 32,
    full_token_interval: int = 6,
    budgets: Sequence[int | None] = DEFAULT_BUDGETS,
    tolerance: float = 0.02,
    progress: bool = True,
    strict: bool = False,
) -> FFNSkipPolicy:
    """An FFNSkipPolicy whose measured skip ratio on ``prompts`` is within ``tolerance`` of
    ``target_skip_ratio`` and that, among the candidates tried, agrees best with dense greedy
    decoding. When no candidate reaches the target, returns the closest one with a
    CalibrationWarning, or raises ValueError if ``strict``."""
    check_calibration_arguments(target_skip_ratio, max_new_tokens, warmup_tokens, tolerance,
                                budgets)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    previous = decoder.policy
    try:
        refs = dense_references(decoder, tokenizer, prompts, max_new_tokens, progress)
        start, end = cold_regions(np.concatenate([r.scores for r in refs]))
        eligible = decoder.config.num_layers - start - end
        scores = np.concatenate([r.scores.ravel() for r in refs])
        low, high = float(np.nanmin(scores)) - 1e-3, min(1.0, float(np.nanmax(scores)))
        ks = sorted({eligible if k is None else min(k, eligible) for k in budgets})
        candidates: list[Candidate] = []

        def measure(policy: FFNSkipPolicy) -> float:
            candidates.append(teacher_forced(decoder, policy, refs))
            return candidates[-1].skip_ratio

        for k in tqdm(ks, desc="calibrating K", disable=not progress):
            base = FFNSkipPolicy(threshold=high, warmup_tokens=warmup_tokens,
                                 cold_start=start, cold_end=end, max_skips_per_token=k,
                                 full_token_interval=full_token_interval)
            simulated = _bisect(base, target_skip_ratio, lambda p: _simulated_ratio(p, refs),
                                low, high, 30)
            guess, _ = min(simulated, key=lambda m: abs(m[1] - target_skip_ratio))
            # The dense scores predict the ratio closely but not exactly (skips change later
            # scores): measure the guess, and refine around it only when it misses.
            if abs(measure(guess) - target_skip_ratio) > tolerance / 2:
                window = 0.01
                _bisect(guess, target_skip_ratio, measure, max(low, guess.threshold - window),
                        min(high, guess.threshold + window), 3)
    finally:
        decoder.set_policy(previous)
    within = [c for c in candidates if abs(c.skip_ratio - target_skip_ratio) <= tolerance]
    if within:
        return max(within,
                   key=lambda c: (c.agreement, -abs(c.skip_ratio - target_skip_ratio))).policy
    closest = min(candidates, key=lambda c: (abs(c.skip_ratio - target_skip_ratio),
                                             -c.agreement))
    message = (f"no candidate reached skip ratio {target_skip_ratio:.3f} +- {tolerance} "
               f"(closest {closest.skip_ratio:.3f}); with {warmup_tokens} warm-up tokens of "
               f"{max_new_tokens}, try more tokens, fewer warm-up tokens or a smaller target")
    if strict:
        raise ValueError(message)
    warnings.warn(f"{message}; returning the closest policy", CalibrationWarning, stacklevel=2)
    return closest.policy


def check_calibration_arguments(target_skip_ratio: float, max_new_tokens: int,
                                warmup_tokens: int, tolerance: float,
                                budgets: Sequence[int | None]) -> None:
    """The checks calibrate() makes before its dense references, which take minutes on a real
    model (the CLI makes them before loading the model)."""
    if not budgets or any(k is not None and (isinstance(k, bool) or not isinstance(k, int)
                                             or k < 1) for k in budgets):
        raise ValueError("budgets (--max-skips) must be integers >= 1 or None (no limit), got "
                         f"{tuple(budgets)!r}")
    if isinstance(target_skip_ratio, bool) or not isinstance(target_skip_ratio, (int, float)) \
            or not 0 < target_skip_ratio < 1:
        raise ValueError(f"target_skip_ratio must be in (0, 1), got {target_skip_ratio!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(warmup_tokens, bool) or not isinstance(warmup_tokens, int) \
            or warmup_tokens < 0:
        raise ValueError(f"warmup_tokens must be an integer >= 0, got {warmup_tokens!r}")
    if warmup_tokens >= max_new_tokens:
        raise ValueError(f"warmup_tokens {warmup_tokens} >= max_new_tokens {max_new_tokens}: "
                         "every decode token would run dense, no skip ratio can be reached")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")


def block_influence(decoder: Decoder, token_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Block Influence per layer, BI_l = 1 - mean_t cos(x_l, x_{l+1}) over every token of the
    sequences (ShortGPT), measured densely; layer drop removes the lowest-BI layers."""
    previous = decoder.policy
    decoder.reset()  # leaving a FiRST policy needs an empty cache
    decoder.set_policy(DensePolicy())
    decoder.enable_trace(True)
    decoder.clear_trace()
    try:
        for seq in token_sequences:
            if len(seq) < 2:
                continue
            decoder.reset()
            decoder.prefill(list(seq[:1]))
            for token in seq[1:]:
                decoder.step(token)
        layer_scores = decoder.trace()["layer_score"]
    finally:
        decoder.enable_trace(False)
        decoder.clear_trace()
        decoder.set_policy(previous)
    if not len(layer_scores):
        raise ValueError("block_influence needs sequences of at least two tokens")
    return 1.0 - np.nanmean(layer_scores, axis=0)


def rank_layers_for_drop(influence: np.ndarray, count: int) -> list[int]:
    """The `count` layers with the lowest Block Influence, sorted."""
    return sorted(int(i) for i in np.argsort(influence, kind="stable")[:count])


def first_layer_skip(decoder: Decoder, policy: Policy,
                     prompts: Sequence[Sequence[int]]) -> float:
    """Mean share of layers a FiRST policy routes off, over prompts (each its own sequence)."""
    previous = decoder.policy
    decoder.reset()
    decoder.set_policy(policy)
    skipped = []
    try:
        for prompt in prompts:
            decoder.reset()
            decoder.prefill(list(prompt))
            skipped.append(1.0 - float(decoder.stats().layer_active.mean()))
    finally:
        decoder.reset()
        decoder.set_policy(previous)
    return float(np.mean(skipped))


def calibrate_first(decoder: Decoder, routers: Any, prompts: Sequence[Sequence[int]],
                    target_layer_skip: float, tolerance: float = 0.04,
                    steps: int = 24) -> FiRSTPolicy:
    """The FiRST policy with these routers whose threshold skips ``target_layer_skip`` of the
    layers on average over the prompts (token ids): bisection of the threshold in logit space,
    where the skipped share grows with it. Raises ValueError when no threshold comes within
    ``tolerance`` (routers whose gates cluster can only reach some ratios)."""
    low, high = -30.0, 30.0  # threshold logits: every layer kept .. every layer skipped
    best: tuple[float, FiRSTPolicy] | None = None
    for _ in range(steps):
        mid = (low + high) / 2
        policy = FiRSTPolicy(routers, float(1.0 / (1.0 + np.exp(-mid))))
        ratio = first_layer_skip(decoder, policy, prompts)
        if best is None or abs(ratio - target_layer_skip) < abs(best[0] - target_layer_skip):
            best = (ratio, policy)
        if ratio < target_layer_skip:
            low = mid
        else:
            high = mid
    assert best is not None
    if abs(best[0] - target_layer_skip) > tolerance:
        raise ValueError(f"no FiRST threshold skips {target_layer_skip:.3f} +- {tolerance} of "
                         f"the layers on the calibration prompts (closest {best[0]:.3f})")
    return best[1]
