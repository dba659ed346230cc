"""Skip policies: FFN-SkipLLM and the baselines it is measured against.

Policies are plain values. The engine checks their values twice: when a policy is made (what
holds for any model) and in ``Decoder.set_policy``, which resolves the model-dependent
defaults (cold regions, the skip budget) and checks them against the model; this module only
checks Python types. The rule itself runs in the engine (``csrc/core/skip_rule.h``), on the
device for CUDA. What each policy does is ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import numpy as np

from .. import _core
from .routers import Routers, default_router_path, load_routers, model_routers

POLICY_FORMAT_VERSION = 1


def _check_int(name: str, value: object, optional: bool = False) -> None:
    """A Python int the engine's 32-bit field can hold (the engine checks the value)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{name} is out of range, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _check_layers(name: str, layers: object) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{name} must be a list of layer indices, got {layers!r}")
    values = tuple(layers)  # type: ignore[arg-type]
    for v in values:
        _check_int(name, v)
    return tuple(sorted(values))


def default_cold_layers(num_layers: int) -> int:
    """Cold regions at each end: about L/6 (5 for 32-40 layers)."""
    return max(1, round(num_layers / 6))


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class: ``kind`` names the policy in JSON and in the engine."""

    kind: ClassVar[str] = ""

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        """The engine's parameters for a model of ``num_layers`` layers; None leaves out the
        model-dependent defaults (for the checks of a policy made before any model)."""
        raise NotImplementedError

    def _validate(self) -> None:
        """The engine's checks of what holds for any model (``Decoder.set_policy`` checks
        the rest)."""
        _core.validate_policy(**self.engine_args(None))

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return {"kind": self.kind, "version": POLICY_FORMAT_VERSION, **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclasses.dataclass(frozen=True)
class DensePolicy(Policy):
    kind: ClassVar[str] = "dense"

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclasses.dataclass(frozen=True)
class FFNSkipPolicy(Policy):
    """FFN-SkipLLM: skip the FFN of middle layers while the residual stream is saturated.

    The score of a layer is cos(a_l, x_{l+1}), the residual stream just before and after its
    FFN add, clamped to [-1, 1]; the last computed layer's score must exceed ``threshold``
    to skip the next eligible FFN. At most ``max_skips_per_token`` FFNs are skipped per token,
    in one contiguous run. The first ``warmup_tokens`` decode tokens and every
    ``full_token_interval``-th token after them run dense; prefill never skips.
    ``cold_start``/``cold_end`` layers at each end are never skipped (None: about L/6 each);
    ``max_skips_per_token`` None: no limit within the run.
    """

    kind: ClassVar[str] = "ffn_skip"
    threshold: float = 0.95
    warmup_tokens: int = 32
    cold_start: int | None = None
    cold_end: int | None = None
    max_skips_per_token: int | None = None
    full_token_interval: int = 6

    def __post_init__(self) -> None:
        _check_number("threshold", self.threshold)
        _check_int("warmup_tokens", self.warmup_tokens)
        _check_int("cold_start", self.cold_start, optional=True)
        _check_int("cold_end", self.cold_end, optional=True)
        _check_int("max_skips_per_token", self.max_skips_per_token, optional=True)
        _check_int("full_token_interval", self.full_token_interval)
        self._validate()

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        cold = None if num_layers is None else default_cold_layers(num_layers)
        args = {
            "kind": self.kind,
            "threshold": float(self.threshold),
            "warmup_tokens": self.warmup_tokens,
            "full_token_interval": self.full_token_interval,
            "max_skips": num_layers if self.max_skips_per_token is None
            else self.max_skips_per_token,
            "cold_start": cold if self.cold_start is None else self.cold_start,
            "cold_end": cold if self.cold_end is None else self.cold_end,
        }
        return {k: v for k, v in args.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class _LayerSetPolicy(Policy):
    """A policy defined by a set of layer indices (sorted, unique)."""

    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_layers("layers", self.layers))
        self._validate()

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        return {"kind": self.kind, "layers": list(self.layers)}


@dataclasses.dataclass(frozen=True)
class StaticFFNSkip(_LayerSetPolicy):
    """The same FFN blocks skipped on every decode token (the non-adaptive baseline)."""

    kind: ClassVar[str] = "static_ffn"


@dataclasses.dataclass(frozen=True)
class RandomFFNSkip(Policy):
    """``k`` random eligible FFN blocks skipped per decode token, reproducible from ``seed``."""

    kind: ClassVar[str] = "random_ffn"
    k: int = 0
    seed: int = 0
    cold_start: int | None = None
    cold_end: int | None = None

    def __post_init__(self) -> None:
        _check_int("k", self.k)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        _check_int("cold_start", self.cold_start, optional=True)
        _check_int("cold_end", self.cold_end, optional=True)
        self._validate()

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        cold = None if num_layers is None else default_cold_layers(num_layers)
        args = {
            "kind": self.kind,
            "max_skips": self.k,
            "seed": self.seed,
            "cold_start": cold if self.cold_start is None else self.cold_start,
            "cold_end": cold if self.cold_end is None else self.cold_end,
        }
        return {k: v for k, v in args.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class LayerDrop(_LayerSetPolicy):
    """Whole layers removed for every token, prefill included (ShortGPT); they write no K/V.
    ``block_influence`` (in ``ffnskip_ext.tuning``) ranks layers for it."""

    kind: ClassVar[str] = "layer_drop"


@dataclasses.dataclass(frozen=True)
class SubBlockSkip(Policy):
    """Chosen sub-blocks of chosen layers, the same on every token: the attention of
    ``attention`` removed for every token, prefill included (as in layer drop: no K/V), and
    the FFN of ``ffn`` skipped on every decode token (as in static FFN skip). A static draft
    for speculative decoding (``tuning.calibrate_draft`` picks one)."""

    kind: ClassVar[str] = "sub_block"
    attention: tuple[int, ...] = ()
    ffn: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention", _check_layers("attention", self.attention))
        object.__setattr__(self, "ffn", _check_layers("ffn", self.ffn))
        self._validate()

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        return {"kind": self.kind, "attention_layers": list(self.attention),
                "layers": list(self.ffn)}


@dataclasses.dataclass(frozen=True)
class EarlyExit(Policy):
    """Each decode token exits after layer ``exit_layer - 1``; the exited hidden state is
    copied up as the input of the skipped layers, which only write their K/V from it."""

    kind: ClassVar[str] = "early_exit"
    exit_layer: int = 0

    def __post_init__(self) -> None:
        _check_int("exit_layer", self.exit_layer)
        self._validate()

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        return {"kind": self.kind, "exit_layer": self.exit_layer}


@dataclasses.dataclass(frozen=True)
class FiRSTPolicy(Policy):
    """FiRST: per-layer routers decide from the prompt which layers the sequence runs.

    In the first pass of a sequence (the prefill after ``reset()``), layer l's router sees the
    mean over the prompt of the layer's input RMSNorm, ``g_l = sigmoid(w_l . m_l + b_l)``; the
    layer is skipped for the prompt and every decode token when ``g_l < threshold``. Skipped
    layers write no KV cache (on the CPU their cache is released). ``routers`` is a router
    file (``ffnskip train-routers`` writes one next to the model) or a ``Routers`` value.
    Set mid-sequence, it routes from the next sequence (after ``reset()``); leaving it
    mid-sequence is refused when it skipped layers, whose K/V are missing.
    """

    kind: ClassVar[str] = "first"
    routers: Routers | str | os.PathLike[str] = ""
    threshold: float = 0.5

    def __post_init__(self) -> None:
        _check_number("threshold", self.threshold)
        if not isinstance(self.routers, Routers):
            if not isinstance(self.routers, (str, os.PathLike)) or not os.fspath(self.routers):
                raise ValueError(f"routers must be a router file or Routers, got {self.routers!r}")
            object.__setattr__(self, "routers", load_routers(self.routers))
        self._validate()

    @classmethod
    def for_model(cls, model_path: str | os.PathLike[str], threshold: float = 0.5) -> FiRSTPolicy:
        """The routers trained for a model: next to it, or shipped for the bundled model."""
        path = model_routers(model_path)
        if path is None:
            raise FileNotFoundError(
                f"no FiRST routers for {os.fspath(model_path)} (expected "
                f"{default_router_path(model_path)}): train them with `ffnskip train-routers "
                "--model MODEL`, or load a router file with FiRSTPolicy(path)")
        return cls(path, threshold)

    def engine_args(self, num_layers: int | None) -> dict[str, Any]:
        routers: Routers = self.routers  # type: ignore[assignment]
        return {"kind": self.kind, "threshold": float(self.threshold),
                "router_weight": routers.weight, "router_bias": routers.bias}

    def to_dict(self) -> dict[str, Any]:
        routers: Routers = self.routers  # type: ignore[assignment]
        if routers.path is None:
            raise ValueError("routers: save them to a file first (Routers.save); a policy file "
                             "names its router file")
        return {"kind": self.kind, "version": POLICY_FORMAT_VERSION,
                "routers": os.fspath(routers.path), "threshold": self.threshold}


# In the engine's order of kinds (_core.POLICY_KINDS; tests/test_layers.py checks it).
POLICY_TYPES: dict[str, type[Policy]] = {
    cls.kind: cls
    for cls in (DensePolicy, FFNSkipPolicy, StaticFFNSkip, RandomFFNSkip, LayerDrop, EarlyExit,
                FiRSTPolicy, SubBlockSkip)
}


def policy_from_dict(data: dict[str, Any]) -> Policy:
    if not isinstance(data, dict):
        raise ValueError(f"a policy must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in POLICY_TYPES:
        raise ValueError(f"kind: unknown policy kind {kind!r} (known: {', '.join(POLICY_TYPES)})")
    version = data.get("version")
    if version != POLICY_FORMAT_VERSION:
        raise ValueError(f"version: policy format {version!r} is not supported "
                         f"(this build reads version {POLICY_FORMAT_VERSION})")
    cls = POLICY_TYPES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known - {"kind", "version"}
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))}: unknown field(s) for policy {kind!r}")
    return cls(**{k: v for k, v in data.items() if k in known})


# The 'ffn-skip' preset's cap: 48 greedy tokens of SmolLM2 on a QA, a code and a poem prompt
# keep their dense answers with it and collapse without it (2026-12-01); the probe on
# the 1.5B: 4 stays right where 0.95 uncapped answers "the the the of Canberra".
SAFE_MAX_SKIPS = 4


def is_aggressive(policy: Policy) -> bool:
    """An FFN-SkipLLM policy with no cap on the FFNs skipped per token: known to change answers."""
    return isinstance(policy, FFNSkipPolicy) and policy.max_skips_per_token is None


def load_policy(source: str | os.PathLike[str] | dict[str, Any]) -> Policy:
    """A policy from a JSON file, a JSON string or a dict; also the names 'dense' and
    'ffn-skip' (the shipped preset: FFNSkipPolicy capped at SAFE_MAX_SKIPS FFNs per token,
    since the uncapped defaults turn answers into garbage on SmolLM2-135M and
    Qwen2.5-Coder-1.5B once the warm-up ends)."""
    if isinstance(source, dict):
        return policy_from_dict(source)
    text = os.fspath(source)
    if text in ("dense", "ffn-skip", "ffn_skip"):
        return DensePolicy() if text == "dense" else FFNSkipPolicy(
            max_skips_per_token=SAFE_MAX_SKIPS)
    if not text.lstrip().startswith("{"):
        if not os.path.isfile(text):
            raise FileNotFoundError(f"policy file not found: {text}")
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"policy JSON is not valid: {e}") from e
    return policy_from_dict(data)


def simulate_ffn_skip(
    policy: FFNSkipPolicy, scores: np.ndarray, first_decode_index: int = 0
) -> np.ndarray:
    """The engine's FFN-SkipLLM decisions (bool ``[tokens, layers]``) for given per-token,
    per-layer scores, e.g. a dense trace: the score of a layer the rule skips is ignored.
    Runs the engine's own rule, so it matches what decoding would decide for those scores."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [tokens, layers], got shape {scores.shape}")
    return _core.simulate_ffn_skip(
        scores, first_decode_index=first_decode_index, **policy.engine_args(scores.shape[1])
    )
