"""The ``Decoder``: a model loaded into the native engine, with its KV cache."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .. import _core
from ..config import ModelConfig
from ..loaders import open_checkpoint, weights_from_hf_model
from .policies import DensePolicy, Policy

DEFAULT_DTYPE = "auto"
_INT64 = np.iinfo(np.int64)


@dataclasses.dataclass
class DecodeStats:
    """Decode-step counters since the decoder was made or ``reset_stats()``."""

    decode_tokens: int
    warmup_tokens: int  # decode tokens inside an FFNSkipPolicy's warm-up
    ffn_run: np.ndarray  # [layers] FFN blocks run
    ffn_skipped: np.ndarray  # [layers] FFN blocks skipped
    ffn_skipped_after_warmup: np.ndarray
    layer_skipped: np.ndarray  # [layers] attention dropped or reduced to K/V only
    # The current sequence rather than counters:
    layer_active: np.ndarray  # [layers] bool: the layer runs (FiRST routes per sequence)
    router_gate: np.ndarray  # [layers] FiRST gates of this sequence, NaN until routed
    kv_cache_bytes: int  # KV cache allocated now (FiRST releases skipped layers' on the CPU)
    weight_bytes_read: int  # by the decode steps: every weight of what they ran, once

    @property
    def weight_bytes_per_token(self) -> float:
        """Weight bytes the decode steps read, per step (skipped sub-blocks read none)."""
        return self.weight_bytes_read / self.decode_tokens if self.decode_tokens else 0.0

    @property
    def skip_ratio(self) -> float:
        """Skipped FFN blocks / (decode tokens x layers), warm-up included."""
        total = self.decode_tokens * len(self.ffn_skipped)
        return float(self.ffn_skipped.sum()) / total if total else 0.0

    @property
    def skip_ratio_after_warmup(self) -> float:
        total = (self.decode_tokens - self.warmup_tokens) * len(self.ffn_skipped)
        return float(self.ffn_skipped_after_warmup.sum()) / total if total > 0 else 0.0

    @property
    def layer_skip_ratio(self) -> float:
        total = self.decode_tokens * len(self.layer_skipped)
        return float(self.layer_skipped.sum()) / total if total else 0.0


class Decoder:
    """Token-by-token decoding of a LLaMA-family model.

    ``prefill`` appends a prompt to the cache and returns the logits of its last token;
    ``step`` appends one token and returns its logits. Invalid input raises ``ValueError``
    (or ``TypeError`` for non-integer ids) and leaves the cache and position unchanged.

    Threads: every call that changes the decoder (prefill, step, reset, truncate, set_policy,
    enable_trace, reset_stats, clear_trace) waits while another thread holds ``exclusive()``,
    as ``generate`` and ``ChatSession.generate`` do for a whole generation; reads (position,
    stats, trace) wait only for the pass running now. A prefill in the main thread stops at
    Ctrl-C (KeyboardInterrupt) within about 50 ms plus one layer, with the cache unchanged.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, np.ndarray | Any],
        device: str = "cpu",
        dtype: str | None = None,
        max_seq_len: int | None = None,
        num_threads: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """``kv_cache_dtype``: the KV cache's elements, ``"auto"`` (float32 on the CPU, the
        activation dtype on CUDA) or, on the CPU, ``"float16"``: half the cache's memory and
        of the bytes each decode step's attention reads, for K/V rounded to fp16 (llama.cpp's
        default cache)."""
        # The engine checks device, dtype and the values; here only what its binding cannot
        # say well: Python types, and 0, which means "default" to the engine.
        for name, value in (("device", device), ("dtype", dtype),
                            ("kv_cache_dtype", kv_cache_dtype)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        for name, value in (("max_seq_len", max_seq_len), ("num_threads", num_threads)):
            if value is not None and (not _is_int(value) or not 0 < value < 2**31):
                raise ValueError(f"{name} must be an integer in [1, 2**31), got {value!r}")
        self.config = config
        self.device = device
        self._native = _core.Decoder(
            config, dict(weights), device, dtype or DEFAULT_DTYPE, int(max_seq_len or 0),
            int(num_threads or 0), kv_cache_dtype,
        )
        self.kv_cache_dtype = kv_cache_dtype
        self._policy: Policy = DensePolicy()
        self._draft_policy: Policy = DensePolicy()
        self._owner = threading.RLock()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Decoder]:
        """Own the decoder for a sequence of calls: other threads' changing calls wait until
        the block ends (reentrant: the owner's own calls go through)."""
        with self._owner:
            yield self

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        device: str = "cpu",
        dtype: str | None = None,
        max_seq_len: int | None = None,
        num_threads: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> Decoder:
        """Load a Hugging Face model directory or a ``.gguf`` file, memory-mapped: with the
        default ``dtype`` (``"auto"``) each tensor is read in place, in the type the file
        stores (GGUF block formats included); ``"float32"``, ``"float16"`` or ``"bfloat16"``
        convert the weights."""
        config, weights = open_checkpoint(path)
        return cls(config, weights, device, dtype, max_seq_len, num_threads, kv_cache_dtype)

    @classmethod
    def from_hf_model(
        cls,
        model: Any,
        device: str = "cpu",
        dtype: str | None = None,
        max_seq_len: int | None = None,
        num_threads: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> Decoder:
        """Copy the weights of an in-memory ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``."""
        config, weights = weights_from_hf_model(model)
        return cls(config, weights, device, dtype, max_seq_len, num_threads, kv_cache_dtype)

    @property
    def max_seq_len(self) -> int:
        return self._native.max_seq_len

    @property
    def position(self) -> int:
        """Number of tokens in the KV cache."""
        return self._native.position

    def reset(self) -> None:
        """Empty the KV cache."""
        with self._owner:
            self._native.reset()

    def truncate(self, position: int) -> None:
        """Keep the first ``position`` tokens of the cache (``0 <= position <= self.position``);
        later calls overwrite what followed. A FiRST sequence keeps its routing (a pass at
        position 0 routes a new one). Decode steps after the cut continue the generation that
        began at the last prefill, for warm-up counting."""
        if not _is_int(position):
            raise TypeError(f"position must be an integer, got {type(position).__name__}")
        if not -(2**31) <= int(position) < 2**31:
            raise ValueError(f"truncate: position {position} is outside [0, {self.position}]")
        with self._owner:
            self._native.truncate(int(position))

    def prefill(self, token_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Append a prompt; returns float32 logits ``[vocab_size]`` of its last token."""
        ids = _token_array(token_ids)
        with self._owner:
            return self._native.prefill(ids)

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; returns its float32 logits ``[vocab_size]``."""
        if not _is_int(token_id):
            raise TypeError(f"token id must be an integer, got {type(token_id).__name__}")
        if not _INT64.min <= int(token_id) <= _INT64.max:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        with self._owner:
            return self._native.step(int(token_id))

    def verify(self, token_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Append k tokens (1 <= k <= 65) in one pass under the policy; returns float32
        logits ``[k, vocab_size]``, row t those after token t: what k ``step`` calls return,
        to float rounding, with each weight read once. The policy must decide nothing per
        token (dense, StaticFFNSkip, LayerDrop, FiRST). Speculative decoding verifies drafts
        with it; ``truncate`` then drops the rejected tail. Not counted in ``stats()``."""
        return self._native.verify(_token_array(token_ids))

    def draft_step(self, token_id: int) -> np.ndarray:
        """Append one token under the draft policy (``set_draft_policy``, dense until set);
        returns its logits. Same cache as ``step``; not counted in ``stats()``."""
        if not _is_int(token_id):
            raise TypeError(f"token id must be an integer, got {type(token_id).__name__}")
        if not _INT64.min <= int(token_id) <= _INT64.max:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        return self._native.draft_step(int(token_id))

    @property
    def verifies(self) -> bool:
        """``verify`` works under the policy: it decides nothing per token."""
        return bool(self._native.verifies)

    @property
    def draft_policy(self) -> Policy:
        return self._draft_policy

    def set_draft_policy(self, policy: Policy) -> None:
        """The skip policy of later ``draft_step`` calls. Policy and draft stay compiled side
        by side, so alternating ``draft_step`` and ``verify`` costs nothing. A FiRST draft is
        routed by the pass that starts a sequence (under a policy that runs every layer).
        Invalid values raise ``ValueError`` and the previous draft policy stays."""
        if not isinstance(policy, Policy):
            raise TypeError(f"expected a Policy, got {type(policy).__name__}")
        self._native.set_draft_policy(**policy.engine_args(self.config.num_layers))
        self._draft_policy = policy

    @property
    def dtype(self) -> str:
        """How the weights are stored: "auto" (as the checkpoint stores them), or the type they
        were converted to. ``weight_bytes`` gives the types."""
        return self._native.dtype

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the weights per tensor type ("F32", "BF16", "Q4_K", ...), as the backend
        holds them."""
        return dict(self._native.weight_bytes)

    @property
    def weight_conversions(self) -> dict[str, tuple[str, str]]:
        """The weight matrices the backend holds in another type than the checkpoint's:
        name -> (stored type, held type). With dtype "auto" the CPU backend converts none; the
        CUDA backend reads Q8_0, Q5_0, Q4_K, Q6_K and F16 as stored and converts every other
        type to F16. An explicit dtype converts every matrix of another type."""
        return dict(self._native.weight_conversions)

    @property
    def dense_step_bytes(self) -> int:
        """Weight bytes a dense decode step reads: every layer and the LM head."""
        return int(self._native.dense_step_bytes)

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Apply a skip policy to later decode steps. Invalid values raise ``ValueError``
        naming the field, and the previous policy stays."""
        if not isinstance(policy, Policy):
            raise TypeError(f"expected a Policy, got {type(policy).__name__}")
        args = policy.engine_args(self.config.num_layers)
        with self._owner:
            self._native.set_policy(**args)
            self._policy = policy

    def stats(self) -> DecodeStats:
        return DecodeStats(**self._native.stats())

    def reset_stats(self) -> None:
        with self._owner:
            self._native.reset_stats()

    def enable_trace(self, enabled: bool = True) -> None:
        """Record every later decode step (skips and scores); see ``trace()``."""
        with self._owner:
            self._native.enable_trace(bool(enabled))

    def trace(self) -> dict[str, np.ndarray]:
        """Per recorded decode step and layer: ``ffn_skipped`` and ``layer_skipped`` (bool),
        ``score`` = cos(a_l, x_{l+1}) and ``layer_score`` = cos(x_l, x_{l+1}) (float32, NaN
        where not computed), each ``[steps, layers]``."""
        return self._native.trace()

    def clear_trace(self) -> None:
        with self._owner:
            self._native.clear_trace()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Decoder({c.architecture}, layers={c.num_layers}, hidden={c.hidden_size}, "
            f"device={self.device!r}, position={self.position}/{self.max_seq_len})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _token_array(token_ids: Iterable[int] | np.ndarray) -> np.ndarray:
    if isinstance(token_ids, (str, bytes)):
        raise TypeError("token ids must be integers; tokenize text first")
    ids = np.asarray(token_ids if isinstance(token_ids, np.ndarray) else list(token_ids))
    if ids.ndim != 1:
        raise ValueError(f"token ids must be a 1-D sequence, got shape {ids.shape}")
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    if ids.dtype == object:  # Python ints beyond int64
        for i, v in enumerate(ids):
            if not _is_int(v):
                raise TypeError(f"token id at index {i} is not an integer: {v!r}")
            if not _INT64.min <= v <= _INT64.max:
                raise ValueError(f"token id {v} at index {i} is outside the vocabulary")
        return ids.astype(np.int64)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.dtype.kind == "u" and ids.max() > _INT64.max:
        raise ValueError(f"token id {ids.max()} is outside the vocabulary")
    return ids.astype(np.int64, copy=False)
