"""Checkpoint readers: LLaMA-family configs and weights from Hugging Face directories,
GGUF files or in-memory transformers models, under Hugging Face tensor names.

Every loader checks each tensor's shape against the :class:`ModelConfig` (the engine's own
tensor list, ``_core.model_tensors``) so that a bad checkpoint fails here, with names,
rather than in the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..config import ModelConfig
from .gguf import gguf_tensors, is_gguf, load_gguf
from .hf import hf_dir_tensors, load_hf_dir, weights_from_hf_model
from .tensors import Weights, expected_shapes

__all__ = ["Weights", "expected_shapes", "load_checkpoint", "open_checkpoint",
           "weights_from_hf_model"]


def open_checkpoint(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and every tensor the engine reads from a Hugging Face model directory or a
    ``.gguf`` file, memory-mapped in their stored formats (``_core.Tensor``): what
    ``Decoder.from_pretrained`` reads in place."""
    return _load(path, gguf_tensors, hf_dir_tensors)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[ModelConfig, Weights]:
    """Load a Hugging Face model directory or a ``.gguf`` file as arrays.

    Returns the config and ``{hf_tensor_name: float32 C-contiguous array}`` holding exactly
    the tensors the engine needs (``lm_head.weight`` only when embeddings are untied), in
    Hugging Face order (GGUF's LLaMA Q and K rows put back).
    """
    return _load(path, load_gguf, load_hf_dir)


def _load(path: str | os.PathLike[str], gguf: Callable[[str], Any],
          directory: Callable[[str], Any]) -> Any:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        return directory(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file (a FIFO or device cannot be a checkpoint)")
    if is_gguf(path):
        return gguf(path)
    raise ValueError(f"{path}: expected a Hugging Face model directory or a GGUF file")
