"""Calibration of each skip method on a model: FFN-SkipLLM to a target skip ratio, Block
Influence for layer drop, FiRST thresholds to a target layer-skip ratio; and the fastest self
draft for speculative decoding."""

from .calibration import (
    DEFAULT_PROMPTS,
    block_influence,
    calibrate,
    calibrate_first,
    first_layer_skip,
    rank_layers_for_drop,
    read_prompts,
)
from .draft import DraftCalibration, calibrate_draft

__all__ = [
    "DEFAULT_PROMPTS",
    "DraftCalibration",
    "block_influence",
    "calibrate",
    "calibrate_draft",
    "calibrate_first",
    "first_layer_skip",
    "rank_layers_for_drop",
    "read_prompts",
]
