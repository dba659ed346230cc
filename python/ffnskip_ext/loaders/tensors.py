"""The tensors the engine reads, as the native core names and shapes them."""

from __future__ import annotations

import numpy as np

from .. import _core
from ..config import ModelConfig

Weights = dict[str, np.ndarray]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape ([out, in] for linears) of every tensor the engine reads
    (``lm_head.weight`` only when the embeddings are untied)."""
    return {name: tuple(shape) for name, shape in _core.model_tensors(config)}


def check_shape(source: str, name: str, found: tuple[int, ...],
                expected: tuple[int, ...]) -> None:
    if found != expected:
        raise ValueError(
            f"{source}: tensor {name!r} has shape {list(found)}, expected {list(expected)}"
        )
