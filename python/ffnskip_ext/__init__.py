"""ffnskip_ext: LLaMA-family decoding with adaptive compute skipping.

The package is layered, each layer importing only the ones before it:

- ``config`` and the native ``_core``: the model configuration and the engine;
- ``loaders``: checkpoints (Hugging Face directories, GGUF files) into configs and tensors;
- ``runtime``: the decoder, skip policies, FiRST routers, sampling, generation, chat
  sessions that reuse their cache, tokenizer (no torch, no evaluation or training code, no
  argparse);
- ``serve``: the OpenAI-compatible HTTP server (Starlette; not imported here);
- ``tuning``: calibration of each method on a model;
- ``eval``: task sets, the evaluation harness, sweeps and reports;
- ``training``: FiRST router training and the PyTorch reference (needs torch);
- ``cli``: the ``ffnskip`` command.

This module re-exports the runtime's public names.
"""

from ._core import build_info, cuda_available, measure_read_bandwidth
from .config import ModelConfig
from .loaders import load_checkpoint
from .loaders.models import default_model_path
from .runtime.decoder import Decoder, DecodeStats
from .runtime.generate import GenerationResult, encode_prompt, generate
from .runtime.policies import (
    DensePolicy,
    EarlyExit,
    FFNSkipPolicy,
    FiRSTPolicy,
    LayerDrop,
    Policy,
    RandomFFNSkip,
    StaticFFNSkip,
    SubBlockSkip,
    load_policy,
)
from .runtime.routers import Routers, load_routers
from .runtime.sampling import SamplingParams
from .runtime.session import ChatSession
from .runtime.speculative import Speculative, SpeculativeStats
from .runtime.tokenizer import load_tokenizer

__all__ = [
    "ChatSession",
    "DecodeStats",
    "Decoder",
    "DensePolicy",
    "EarlyExit",
    "FFNSkipPolicy",
    "FiRSTPolicy",
    "GenerationResult",
    "LayerDrop",
    "ModelConfig",
    "Policy",
    "RandomFFNSkip",
    "Routers",
    "SamplingParams",
    "Speculative",
    "SpeculativeStats",
    "StaticFFNSkip",
    "SubBlockSkip",
    "build_info",
    "cuda_available",
    "default_model_path",
    "encode_prompt",
    "generate",
    "load_checkpoint",
    "load_policy",
    "load_routers",
    "load_tokenizer",
    "measure_read_bandwidth",
]
