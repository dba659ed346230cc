"""The model options every subcommand shares, and loading the model they name."""

from __future__ import annotations

import argparse
from typing import Any

from .. import _core


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a .gguf file, a Hugging Face directory or a model name "
                        "of `ffnskip models list` (default: smollm2-135m)")
    parser.add_argument("--device", default="cpu", choices=_core.DEVICES)
    parser.add_argument("--dtype", default=None, choices=_core.DTYPES,
                        help="weight storage: auto (as the file stores them, the default) or a "
                        "conversion")
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)


def model_path(args: argparse.Namespace) -> str:
    from ..loaders.models import resolve_model

    return resolve_model(args.model)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The decoder and tokenizer of ``--model`` with the other model options."""
    from ..runtime.decoder import Decoder
    from ..runtime.tokenizer import load_tokenizer

    path = model_path(args)
    decoder = Decoder.from_pretrained(
        path, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
        num_threads=args.threads,
    )
    return decoder, load_tokenizer(path)
