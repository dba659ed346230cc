"""Calibration of each skip method on a model: FFN-SkipLLM to a target skip ratio, Block
Influence for layer drop, FiRST thresholds to a target layer-skip ratio."""

from .calibration import (
    DEFAULT_PROMPTS,
    block_influence,
    calibrate,
    calibrate_first,
    first_layer_skip,
    rank_layers_for_drop,
    read_prompts,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "block_influence",
    "calibrate",
    "calibrate_first",
    "first_layer_skip",
    "rank_layers_for_drop",
    "read_prompts",
]
