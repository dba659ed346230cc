"""Hugging Face checkpoints: a model directory (``config.json`` plus safetensors, sharded or
not; parsed here so that the runtime needs no torch) or an in-memory transformers model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelConfig
from .safetensors import SafetensorsFile
from .tensors import Weights, check_shape, expected_shapes

if TYPE_CHECKING:
    import torch

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def hf_dir_tensors(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and every tensor the engine reads, mapped as stored (``_core.Tensor``)."""
    return _read_dir(directory, native=True)


def load_hf_dir(directory: str) -> tuple[ModelConfig, Weights]:
    """The config and float32 copies of the tensors."""
    return _read_dir(directory, native=False)  # type: ignore[return-value]


def _read_dir(directory: str, native: bool) -> tuple[ModelConfig, dict[str, Any]]:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: no config.json in the model directory")
    with open(config_path, encoding="utf-8") as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: invalid JSON: {e}") from e
    config = ModelConfig.from_hf_dict(hf_config, source=config_path)

    locate = _safetensors_locator(directory)
    files: dict[str, SafetensorsFile] = {}
    weights: dict[str, Any] = {}
    for name, shape in expected_shapes(config).items():
        file_path = locate(name)
        if file_path not in files:
            if not os.path.isfile(file_path):
                raise FileNotFoundError(f"{file_path}: shard listed for {name!r} does not exist")
            files[file_path] = SafetensorsFile(file_path)
        st = files[file_path]
        # Check the header's shape before touching the data.
        check_shape(file_path, name, st.shape(name), shape)
        weights[name] = st.tensor(name) if native else st.read(name)
    return config, weights


def weights_from_hf_model(model: torch.nn.Module) -> tuple[ModelConfig, Weights]:
    """Extract config and weights from a transformers LlamaForCausalLM / Qwen2ForCausalLM."""
    source = type(model).__name__
    config = ModelConfig.from_hf_dict(model.config.to_dict(), source=source)
    state = model.state_dict()
    weights: Weights = {}
    for name, shape in expected_shapes(config).items():
        if name not in state:
            raise ValueError(f"{source}: missing tensor {name!r}")
        check_shape(source, name, tuple(state[name].shape), shape)
        # Copy so the arrays do not alias the model's parameters.
        weights[name] = np.array(state[name].detach().float().cpu().numpy(), order="C")
    return config, weights


def _safetensors_locator(directory: str) -> Callable[[str], str]:
    """Map a tensor name to the safetensors file that should hold it."""
    single = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.isfile(single):
        return lambda _name: single
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(
            f"{directory}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} found"
        )
    with open(index_path, encoding="utf-8") as f:
        try:
            weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: malformed safetensors index: {e}") from e

    def locate(name: str) -> str:
        if name not in weight_map:
            raise ValueError(f"{index_path}: missing tensor {name!r}")
        return os.path.join(directory, weight_map[name])

    return locate
