"""The CPU's fp16 KV cache (kv_cache_dtype="float16"): logits within fp16's rounding of the
fp32 cache's, half the cache's bytes, every pass kind over it, bad values refused."""

from __future__ import annotations

import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext import LayerDrop, StaticFFNSkip

EPS16 = 2.0**-10

PROMPT = list(range(7, 47))  # 40 tokens: a prefill of the GEMM path (> 16 tokens)
FEED = [3, 250, 17, 99, 41, 2, 2, 180, 63, 5, 11, 70]


def decoder(path, kv_cache_dtype: str, **kwargs) -> ffnskip_ext.Decoder:
    return ffnskip_ext.Decoder.from_pretrained(path, dtype="float32", max_seq_len=96,
                                               num_threads=1, kv_cache_dtype=kv_cache_dtype,
                                               **kwargs)


def run(d: ffnskip_ext.Decoder) -> np.ndarray:
    """The prefill's last logits, then one row per decode step."""
    return np.stack([d.prefill(PROMPT)] + [d.step(t) for t in FEED])


@pytest.mark.parametrize("variant", ["llama_gqa_untied_h72", "qwen2_qkv_bias", "llama_mha_tied"])
def test_fp16_cache_logits_are_the_fp32_caches_within_fp16_rounding(tiny_model_dir,
                                                                     variant) -> None:
    """K and V are rounded once to fp16 (a relative error of at most eps16 / 2 each), the
    products and sums stay fp32: on these 2-3 layer models the logits move by about 1.3
    eps16 of their magnitude; a stale or misplaced cache entry would move them by O(1)."""
    path = tiny_model_dir(variant)[1]
    want = run(decoder(path, "auto"))
    half = decoder(path, "float16")
    got = run(half)
    error = np.abs(got - want).max()
    assert error <= 8 * EPS16 * np.abs(want).max(), error
    assert error > 0  # the cache did round: the option took effect
    assert half.kv_cache_dtype == "float16"


def test_fp16_cache_holds_half_the_bytes(tiny_model_dir) -> None:
    path = tiny_model_dir("llama_gqa_untied_h72")[1]
    full, half = decoder(path, "float32"), decoder(path, "float16")
    for d in (full, half):
        d.prefill(PROMPT[:3])
    assert half.stats().kv_cache_bytes * 2 == full.stats().kv_cache_bytes > 0


@pytest.mark.parametrize("policy", [StaticFFNSkip((1,)), LayerDrop((1,))])
def test_fp16_cache_after_truncate_is_a_fresh_decoders(tiny_model_dir, policy) -> None:
    """Rewritten positions hold the new sequence's K/V: truncating the decoded tokens and
    feeding others gives a fresh decoder's logits bit for bit, under static policies too."""
    path = tiny_model_dir("llama_gqa_untied_h72")[1]
    d = decoder(path, "float16")
    d.set_policy(policy)
    run(d)
    d.truncate(len(PROMPT))
    got = np.stack([d.step(t) for t in FEED[::-1]])
    fresh = decoder(path, "float16")
    fresh.set_policy(policy)
    fresh.prefill(PROMPT)
    np.testing.assert_array_equal(got, np.stack([fresh.step(t) for t in FEED[::-1]]))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"kv_cache_dtype": "bfloat16"}, ValueError, "auto, float32 or float16, got bfloat16"),
    ({"kv_cache_dtype": "int8"}, ValueError, "unknown dtype 'int8'"),
    ({"kv_cache_dtype": 16}, TypeError, "kv_cache_dtype must be a string"),
    ({"kv_cache_dtype": "float16", "device": "cuda"}, ValueError,
     "the CUDA backend holds its KV cache in the activation dtype"),
])
def test_bad_kv_cache_dtype_is_refused(tiny_model_dir, kwargs, error, message) -> None:
    path = tiny_model_dir("llama_gqa_untied_h72")[1]
    with pytest.raises(error, match=message):
        ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=16, **kwargs)
