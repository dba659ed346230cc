"""The policies of a sweep, matched at target skip ratios (default 10%, 20%, 30%); the
matching rule is ``MATCHING`` (also printed in every report)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..config import ModelConfig
from ..runtime.decoder import Decoder
from ..runtime.generate import Message, encode_prompt
from ..runtime.policies import (
    DensePolicy,
    EarlyExit,
    LayerDrop,
    Policy,
    RandomFFNSkip,
    StaticFFNSkip,
)
from ..runtime.speculative import Speculative
from ..tuning.calibration import block_influence, calibrate, calibrate_first, rank_layers_for_drop
from .harness import DENSE_SPEC, PolicySpec

DEFAULT_TARGETS = (0.1, 0.2, 0.3)

MATCHING = """\
How methods are matched at a target ratio r on an L-layer model, with k = round(r * L):

- ``static_ffn``: the FFNs of a contiguous window of k middle layers (the authors'
  non-adaptive baseline), skipped on every decode token: exactly k/L of the FFN blocks;
- ``random_ffn``: k random FFNs per decode token (seeded) among the layers outside the
  default cold regions (about L/6 at each end): exactly k/L;
- ``layer_drop``: the k layers of lowest Block Influence, measured densely on train-split
  prose (ShortGPT); whole layers, attention included, for every token, prompt included:
  k/L of the FFN blocks and of the layers;
- ``early_exit``: every decode token runs the first L-k layers and copies its state up:
  k/L of the FFN blocks, and the last k layers run only their K/V projections;
- ``ffn_skip`` (FFN-SkipLLM): ``calibration.calibrate`` searches the threshold for the
  budgets ceil(1.5 r L) and unlimited, teacher-forced on calibration prompts, to reach r
  over all decode tokens (warm-up included), and keeps the candidate that agrees best with
  dense decoding. Its ratio on the evaluated tasks is measured, not fixed, and it is lower
  on short answers, where warm-up tokens are a larger share;
- ``first`` (FiRST, matched by layers): trained routers (``ffnskip train-routers``) with the
  threshold bisected so that the calibration prompts route r of the layers off on average:
  the layer-skip ratio of layer drop and early exit, decided per prompt;
- ``first_w`` (FiRST, matched by weights): the same routers, thresholded to skip
  r x F / (A + F) of the layers, where F and A are one layer's FFN and attention weights, so
  that it leaves as many weights unread per token as the FFN methods at r.

- ``speculative`` (lossless rows, not matched): dense decoding with drafts (``ngram`` prompt
  lookup, ``self``: the model under a skip policy, ``auto``: n-gram, else self) verified by
  the dense model; the harness checks that every output equals dense's token for token and
  reports the acceptance; perplexity is not rerun (teacher forcing is dense by definition).

The FFN skip ratio (skipped FFN blocks / (decode tokens x L)) is the common axis of the FFN
methods; layer-level methods skip attention work as well, so at the same ratio they remove
more compute. The "weights not read" column puts every method on one axis: the share of the
weights a dense decode step reads (layers and LM head) that the policy's steps did not read.
"""


def weight_counts(config: ModelConfig) -> dict[str, int]:
    """Weights a dense decode step reads, by part: per layer the attention's q/o and k/v
    projections and the FFN, and the LM head."""
    hidden, q, kv = config.hidden_size, config.num_heads * config.head_dim, (
        config.num_kv_heads * config.head_dim)
    return {"attention_qo": 2 * hidden * q, "attention_kv": 2 * hidden * kv,
            "ffn": 3 * hidden * config.intermediate_size, "head": config.vocab_size * hidden,
            "layers": config.num_layers}


def ffn_share_of_layer(config: ModelConfig) -> float:
    counts = weight_counts(config)
    return counts["ffn"] / (counts["ffn"] + counts["attention_qo"] + counts["attention_kv"])


def skipped_blocks(target: float, num_layers: int) -> int:
    """k = round(r * L), at least 1."""
    return max(1, round(target * num_layers))


def budget(target: float, num_layers: int) -> int:
    """FFN-SkipLLM's skip budget K = ceil(1.5 r L): a token skips at most K FFNs, and warm-up
    and interleaved dense tokens make up for the rest (the paper's K ~ r L 6/5 without
    warm-up). Rounded first so that 1.5 * 0.2 * 30 = 9.000000000000002 gives 9."""
    return math.ceil(round(1.5 * target * num_layers, 6))


def middle_window(count: int, num_layers: int) -> list[int]:
    start = (num_layers - count) // 2
    return list(range(start, start + count))


def sweep_specs(
    decoder: Decoder,
    tokenizer: Any,
    targets: Sequence[float],
    calibration_prompts: Sequence[Sequence[Message]],
    influence_sequences: Sequence[Sequence[int]],
    *,
    seed: int = 0,
    warmup_tokens: int = 4,
    calibration_tokens: int = 40,
    speculative: Sequence[str] = ("ngram", "self", "auto"),
    draft_policy: Policy | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    routers: Any = None,
    routing_prompts: Sequence[Sequence[Message]] = (),
) -> list[PolicySpec]:
    """Dense plus every method at every target (FiRST with ``routers``, a ``Routers``) and a
    lossless speculative row per draft source of ``speculative`` (self drafts under
    ``draft_policy``, None: the default draft); a
    target FFN-SkipLLM or FiRST cannot reach on the calibration prompts is reported through
    ``log`` and left out. FiRST thresholds are calibrated on ``routing_prompts`` (default: the
    calibration prompts)."""
    layers = decoder.config.num_layers
    influence = block_influence(decoder, influence_sequences)
    specs = [DENSE_SPEC]
    for target in targets:
        if not 0 < target < 1:
            raise ValueError(f"targets must be in (0, 1), got {target}")
        k = skipped_blocks(target, layers)
        if k >= layers:
            raise ValueError(f"target {target} leaves no layer of {layers}")
        label = f"{round(target * 100)}"
        try:
            policy = calibrate(decoder, tokenizer, calibration_prompts, target,
                               max_new_tokens=calibration_tokens, warmup_tokens=warmup_tokens,
                               budgets=(budget(target, layers), None),
                               progress=progress, strict=True)
            specs.append(PolicySpec(f"ffn_skip@{label}", policy, "ffn_skip", target))
        except ValueError as e:
            log(f"FFN-SkipLLM at {target:.0%} left out: {e}")
        specs += [
            PolicySpec(f"static_ffn@{label}", StaticFFNSkip(middle_window(k, layers)),
                       "static_ffn", target),
            PolicySpec(f"random_ffn@{label}", RandomFFNSkip(k=k, seed=seed), "random_ffn",
                       target),
            PolicySpec(f"layer_drop@{label}", LayerDrop(rank_layers_for_drop(influence, k)),
                       "layer_drop", target),
            PolicySpec(f"early_exit@{label}", EarlyExit(layers - k), "early_exit", target),
        ]
        if routers is not None:
            prompt_ids = [encode_prompt(tokenizer, p)
                          for p in routing_prompts or calibration_prompts]
            share = ffn_share_of_layer(decoder.config)
            for method, layer_target in (("first", target), ("first_w", target * share)):
                try:
                    policy = calibrate_first(decoder, routers, prompt_ids, layer_target)
                    specs.append(PolicySpec(f"{method}@{label}", policy, method, target))
                except ValueError as e:
                    log(f"FiRST ({method}) at {target:.0%} left out: {e}")
    specs += [PolicySpec(f"speculative_{draft}", DensePolicy(), "speculative", None,
                         Speculative(draft=draft, draft_policy=draft_policy))
              for draft in speculative]
    return specs
