"""Checkpoint readers: LLaMA-family configs and weights from Hugging Face directories,
GGUF files or in-memory transformers models, under Hugging Face tensor names.

Every loader checks each tensor's shape against the :class:`ModelConfig` (the engine's own
tensor list, ``_core.model_tensors``) so that a bad checkpoint fails here, with names,
rather than in the engine.
"""

from __future__ import annotations

import os

from ..config import ModelConfig
from .gguf import is_gguf, load_gguf
from .hf import load_hf_dir, weights_from_hf_model
from .tensors import Weights, expected_shapes

__all__ = ["Weights", "expected_shapes", "load_checkpoint", "weights_from_hf_model"]


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[ModelConfig, Weights]:
    """Load a Hugging Face model directory or a ``.gguf`` file.

    Returns the config and ``{hf_tensor_name: float32 C-contiguous array}`` holding exactly
    the tensors the engine needs (``lm_head.weight`` only when embeddings are untied).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        return load_hf_dir(path)
    if is_gguf(path):
        return load_gguf(path)
    raise ValueError(f"{path}: expected a Hugging Face model directory or a GGUF file")
