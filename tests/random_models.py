"""Decoders on random weights made without torch or files, for tests that run in subprocesses
or need a pass that takes a while (a wide model and a long prompt)."""

from __future__ import annotations

import time

import numpy as np

import ffnskip_ext
from ffnskip_ext.config import ModelConfig
from ffnskip_ext.loaders import expected_shapes


def random_decoder(hidden_size: int = 64, num_layers: int = 2, max_seq_len: int = 256,
                   num_threads: int = 2, seed: int = 0) -> ffnskip_ext.Decoder:
    head_dim = 32
    config = ModelConfig(
        architecture="llama", vocab_size=256, hidden_size=hidden_size,
        intermediate_size=3 * hidden_size, num_layers=num_layers,
        num_heads=hidden_size // head_dim, num_kv_heads=max(1, hidden_size // (2 * head_dim)),
        head_dim=head_dim, tie_word_embeddings=True, max_position_embeddings=max_seq_len,
    )
    rng = np.random.default_rng(seed)
    weights = {name: (0.1 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in expected_shapes(config).items()}
    return ffnskip_ext.Decoder(config, weights, max_seq_len=max_seq_len,
                               num_threads=num_threads)


def slow_prefill_decoder(seconds: float = 2.0) -> tuple[ffnskip_ext.Decoder, list[int]]:
    """A decoder and a prompt whose prefill takes about `seconds` or more here: the prompt is
    sized by timing a short prefill on this machine (a fixed 800 tokens fell from 2 s to 0.6 s
    as the kernels and machines got faster, below the tests' 0.8 s)."""
    max_tokens = 4096
    decoder = random_decoder(hidden_size=512, num_layers=24, max_seq_len=max_tokens)
    probe = 256
    start = time.perf_counter()
    decoder.prefill([i % 256 for i in range(probe)])
    took = time.perf_counter() - start
    decoder.reset()
    # Attention grows faster than linearly with the prompt: the estimate errs long.
    tokens = min(max_tokens, max(800, int(probe * seconds / took)))
    return decoder, [i % 256 for i in range(tokens)]
