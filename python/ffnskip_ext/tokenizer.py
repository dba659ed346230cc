"""Tokenizer for a checkpoint: a transformers tokenizer from local files only."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a Hugging Face model directory or of a ``.gguf`` file.

    Never contacts the Hub: a directory must hold the tokenizer files, a GGUF file carries
    its vocabulary, merges and chat template in its metadata.
    """
    # Imported here because transformers is slow to import and the engine itself does not
    # need it.
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    directory, filename = os.path.split(os.path.abspath(path))
    return AutoTokenizer.from_pretrained(directory, gguf_file=filename, local_files_only=True)
