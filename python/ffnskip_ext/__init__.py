"""ffnskip_ext: LLaMA-family decoding with adaptive compute skipping."""

from ._core import build_info, cuda_available, measure_read_bandwidth
from .checkpoint import load_checkpoint
from .config import ModelConfig
from .decoder import Decoder, DecodeStats
from .generate import GenerationResult, encode_prompt, generate
from .models import default_model_path
from .policies import (
    DensePolicy,
    EarlyExit,
    FFNSkipPolicy,
    FiRSTPolicy,
    LayerDrop,
    Policy,
    RandomFFNSkip,
    StaticFFNSkip,
    load_policy,
)
from .sampling import SamplingParams
from .tokenizer import load_tokenizer

__all__ = [
    "DecodeStats",
    "Decoder",
    "DensePolicy",
    "EarlyExit",
    "FFNSkipPolicy",
    "FiRSTPolicy",
    "LayerDrop",
    "Policy",
    "RandomFFNSkip",
    "StaticFFNSkip",
    "load_policy",
    "GenerationResult",
    "ModelConfig",
    "SamplingParams",
    "build_info",
    "cuda_available",
    "default_model_path",
    "generate",
    "encode_prompt",
    "load_checkpoint",
    "load_tokenizer",
    "measure_read_bandwidth",
]
