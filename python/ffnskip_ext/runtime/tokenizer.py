"""Tokenizer for a checkpoint: a transformers tokenizer from local files only, without torch."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..loaders.gguf import open_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



class _NoTorchAdvice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found" advice: the tokenizers used
    here need no torch, so it would only alarm. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


# Set before transformers is imported (it logs the advice from its __init__, on this logger).
logging.getLogger("transformers").addFilter(_NoTorchAdvice())

# What a Hugging Face directory's tokenizer is built from (fast, sentencepiece, BPE, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")

# GGUF metadata keys (under "tokenizer.ggml.") of the special tokens transformers configures.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a Hugging Face model directory or of a ``.gguf`` file.

    Never contacts the Hub: a directory must hold the tokenizer files, a GGUF file carries
    its vocabulary, merges and chat template in its metadata.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
            raise ValueError(f"{path}: no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
        from transformers import AutoTokenizer  # slow to import; the engine does not need it

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _gguf_tokenizer(path)


def _gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """What ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds, but from the
    loader's parse of the file (shared with the weights): transformers' own GGUF reader
    imports torch, which the runtime does not need. The conversion itself is transformers'
    (torch-free) converter."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    parsed = open_gguf(path)
    groups = {
        group: {
            name: v for key, name in renames.items()
            if (v := parsed.field(f"tokenizer.{key}")) is not None
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ValueError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # As transformers: llama.cpp adds BOS to a sentencepiece vocabulary unless told not to.
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = parsed.field(f"tokenizer.ggml.{key}")
        tokens = tokenizer_dict["tokens"]
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} {token_id} is outside the "
                             f"vocabulary of {len(tokens)} tokens")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(parsed.field("general.architecture"),
                                            tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
