"""Every CPU kernel on its own against a NumPy reference (float64), over shapes that whole-model
tests do not reach, on every instruction set this CPU has (in the style of llama.cpp's
test-backend-ops). Error bounds follow from fp32 arithmetic: a sum of n products is within
n * eps32 * sum(|products|) of the exact value, whatever the summation order."""

from __future__ import annotations

import numpy as np
import pytest

from ffnskip_ext import _core

kernels = _core.kernels
EPS32 = float(np.finfo(np.float32).eps)
ISAS = kernels.isas()


@pytest.fixture(scope="module")
def pool():
    return kernels.ThreadPool(2)


def stored(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(what the kernel reads: fp32, or the uint16 bits of bf16/fp16; the exact values)."""
    values = values.astype(np.float32)
    if dtype == "F32":
        return values, values.astype(np.float64)
    if dtype == "F16":
        half = values.astype(np.float16)
        return half.view(np.uint16), half.astype(np.float64)
    bits = values.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # nearest even
    return rounded, (rounded.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def assert_sum_within(got: np.ndarray, exact: np.ndarray, abs_terms: np.ndarray,
                      terms: int) -> None:
    """|got - exact| <= terms * eps32 * sum(|products|) + the rounding of the result."""
    bound = terms * EPS32 * abs_terms + EPS32 * np.abs(exact) + 1e-30
    err = np.abs(got.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
        f"(got {got[worst]}, exact {exact[worst]})")


# out, in: odd widths, widths that are not a multiple of the 16/32-lane blocks, wide rows;
# n: one token (GEMV), up to 16 (dot-product tiles), more (the outer-product panels of 6 or 12
# tokens) with tails of tokens and of rows.
LINEAR_SHAPES = [(1, 1, 1), (33, 37, 1), (50, 64, 3), (96, 576, 1), (200, 72, 5),
                 (64, 100, 12), (70, 130, 16), (70, 130, 23), (40, 33, 29), (576, 1536, 1)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("out_features, in_features, n", LINEAR_SHAPES)
def test_linear(pool, isa, dtype, out_features, in_features, n) -> None:
    rng = np.random.default_rng(out_features * 1000 + in_features + n)
    weight, exact_w = stored(rng.standard_normal((out_features, in_features)), dtype)
    x = rng.standard_normal((n, in_features)).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    y0 = rng.standard_normal((n, out_features)).astype(np.float32)
    products = x.astype(np.float64) @ exact_w.T
    abs_products = np.abs(x.astype(np.float64)) @ np.abs(exact_w).T

    plain = kernels.linear(pool, weight, dtype, None, x, None, isa)
    assert_sum_within(plain, products, abs_products, in_features)
    with_bias = kernels.linear(pool, weight, dtype, bias, x, None, isa)
    assert_sum_within(with_bias, products + bias, abs_products + np.abs(bias), in_features + 1)
    accumulated = kernels.linear(pool, weight, dtype, bias, x, y0, isa)
    assert_sum_within(accumulated, y0 + products + bias,
                      np.abs(y0) + abs_products + np.abs(bias), in_features + 2)


@pytest.mark.parametrize("rows", [97, 1000])
@pytest.mark.parametrize("tokens", [1, 13])
def test_linear_rows_do_not_depend_on_the_thread_count(rows: int, tokens: int) -> None:
    """Threads take the chunks of rows in pieces as they finish (1000 rows: 32 chunks, pieces
    of 1-2 for 2-3 threads): every row is computed once, by the same kernel whatever thread."""
    rng = np.random.default_rng(rows + tokens)
    w = rng.standard_normal((rows, 130)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    x = rng.standard_normal((tokens, 130)).astype(np.float32)
    y0 = rng.standard_normal((tokens, rows)).astype(np.float32)
    one = kernels.linear(kernels.ThreadPool(1), w, "F32", bias, x, y0, ISAS[-1])
    for threads in (2, 3):
        many = kernels.linear(kernels.ThreadPool(threads), w, "F32", bias, x, y0, ISAS[-1])
        np.testing.assert_array_equal(one, many)


def heads_major(cache: np.ndarray, kv_heads: int) -> np.ndarray:
    """[positions, kv_heads * head_dim] as the backend stores it: [kv_heads, positions, dim]."""
    return np.ascontiguousarray(cache.reshape(cache.shape[0], kv_heads, -1).transpose(1, 0, 2))


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int, heads: int,
                        kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(softmax(q k^T / sqrt(d)) v per query and head, causally; the sum of |p v| per output)."""
    n = q.shape[0]
    group = heads // kv_heads
    out = np.zeros((n, heads * head_dim))
    magnitude = np.zeros_like(out)
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    for t in range(n):
        visible = pos + t + 1
        for h in range(heads):
            g = h // group
            qh = q[t, h * head_dim:(h + 1) * head_dim]
            kh = k[:visible, g * head_dim:(g + 1) * head_dim]
            vh = v[:visible, g * head_dim:(g + 1) * head_dim]
            scores = kh @ qh / np.sqrt(head_dim)
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[t, h * head_dim:(h + 1) * head_dim] = p @ vh
            magnitude[t, h * head_dim:(h + 1) * head_dim] = p @ np.abs(vh)
    return out, magnitude


# (n, pos, heads, kv_heads, head_dim): decode over a cache, small prefills (per-query path),
# 16+ queries (the GEMM path) past one 64-query block, > 8 query heads per KV head, MHA,
# head_dim 256; keys in several chunks of 256 (one chunk ending at the query, the next of one
# key), group sizes that leave 1-3 heads after tiles of 4 or 2, head_dims that end in part of
# a vector.
ATTENTION_SHAPES = [(1, 0, 4, 4, 64), (1, 37, 9, 3, 64), (1, 20, 12, 1, 128),
                    (5, 3, 6, 2, 32), (16, 0, 4, 2, 64), (70, 5, 12, 1, 64),
                    (20, 0, 2, 2, 256), (1, 50, 16, 16, 256), (1, 700, 9, 3, 64),
                    (2, 255, 6, 6, 40), (4, 300, 14, 2, 72), (3, 520, 5, 1, 2)]


def as_cache(values: np.ndarray, cache_type: str) -> np.ndarray:
    """A cache as kernels.attention takes it: float32 (F32) or the uint16 bits of F16."""
    return values if cache_type == "F32" else values.astype(np.float16).view(np.uint16)


def cached(values: np.ndarray, cache_type: str) -> np.ndarray:
    """The values as the cache holds them, in float32: fp16 rounds to nearest even."""
    return values if cache_type == "F32" else values.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("cache_type", ["F32", "F16"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, pos, heads, kv_heads, head_dim", ATTENTION_SHAPES)
def test_attention(pool, isa, n, pos, heads, kv_heads, head_dim, cache_type) -> None:
    """Against float64 on the values the cache holds: an fp16 cache rounds K and V once, then
    the kernel widens them exactly and computes as in fp32."""
    rng = np.random.default_rng(n * 100 + pos + heads)
    q = rng.standard_normal((n, heads * head_dim)).astype(np.float32)
    k = rng.standard_normal((pos + n, kv_heads * head_dim)).astype(np.float32)
    v = rng.standard_normal((pos + n, kv_heads * head_dim)).astype(np.float32)
    # The cache holds 3 positions more, NaN: attention reads only the first pos + n.
    spare = np.full((3, kv_heads * head_dim), np.nan, np.float32)
    k_cache, v_cache = (as_cache(heads_major(np.concatenate([a, spare]), kv_heads), cache_type)
                        for a in (k, v))
    got = kernels.attention(pool, q, k_cache, v_cache, pos, heads, isa, cache_type)
    exact, magnitude = attention_reference(q, cached(k, cache_type), cached(v, cache_type), pos,
                                           heads, kv_heads, head_dim)
    # Scores carry head_dim-term sums (amplified by at most |score| through exp), the output
    # a (pos + n)-term weighted sum: a relative bound of a few hundred eps on the magnitudes.
    scale = np.sqrt(head_dim) * 4.0
    bound = (head_dim * scale + pos + n) * EPS32 * (magnitude + 1e-3)
    err = np.abs(got - exact)
    worst = err.argmax()
    assert np.all(err <= bound), f"max error {err.flat[worst]:.3g}, bound {bound.flat[worst]:.3g}"


@pytest.mark.parametrize("heads, head_dim, n, pos", [(1, 2, 1, 0), (3, 64, 4, 9),
                                                      (2, 256, 2, 4000)])
def test_rope(heads, head_dim, n, pos) -> None:
    rng = np.random.default_rng(head_dim + n)
    x = rng.standard_normal((n, heads * head_dim)).astype(np.float32)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    got = kernels.rope(x, pos, inv_freq, heads)
    # transformers: the angle is a float32 product, its cos and sin then rounded to float32.
    angle = inv_freq[None, :] * np.arange(pos, pos + n, dtype=np.float32)[:, None]
    cos = np.cos(angle.astype(np.float64)).astype(np.float32).astype(np.float64)
    sin = np.sin(angle.astype(np.float64)).astype(np.float32).astype(np.float64)
    half = head_dim // 2
    xs = x.astype(np.float64).reshape(n, heads, head_dim)
    a, b = xs[..., :half], xs[..., half:]
    exact = np.concatenate([a * cos[:, None] - b * sin[:, None],
                            b * cos[:, None] + a * sin[:, None]], axis=-1).reshape(n, -1)
    # std::cos/sin of a float may differ from the rounded float64 ones by an ulp.
    bound = 4 * EPS32 * np.concatenate([np.abs(a) + np.abs(b)] * 2, axis=-1).reshape(n, -1)
    assert np.all(np.abs(got - exact) <= bound + 1e-30)


@pytest.mark.parametrize("n, dim", [(1, 1), (3, 64), (2, 577), (1, 8192)])
def test_rms_norm(n, dim) -> None:
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((n, dim)).astype(np.float32) * 3
    w = rng.standard_normal(dim).astype(np.float32)
    got = kernels.rms_norm(x, w, 1e-5)
    xd = x.astype(np.float64)
    inv_rms = 1.0 / np.sqrt((xd * xd).mean(axis=1, keepdims=True) + 1e-5)
    exact = w * (xd * inv_rms)
    assert np.all(np.abs(got - exact) <= (dim + 4) * EPS32 * np.abs(exact) + 1e-30)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, inter", [(1, 1), (3, 160), (2, 1537)])
def test_swiglu(pool, isa, n, inter) -> None:
    rng = np.random.default_rng(inter)
    gate_up = (rng.standard_normal((n, 2 * inter)) * 4).astype(np.float32)
    got = kernels.swiglu(pool, gate_up, isa)
    g, u = gate_up[:, :inter].astype(np.float64), gate_up[:, inter:].astype(np.float64)
    exact = g / (1.0 + np.exp(-g)) * u
    assert np.all(np.abs(got - exact) <= 8 * EPS32 * np.abs(exact) + 1e-30)


@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_over_the_range_of_its_exponential(pool, isa) -> None:
    """e^-g (a vector polynomial) across every float exponent it reaches, its clamps (0 below
    -87.3, inf above 88) and past them, where silu(g) tends to g or to -0."""
    gate = np.concatenate([np.linspace(-100.0, 100.0, 20001), [-88.0, -87.33, 87.33, 88.0, 0.0,
                                                              -0.0, 1e-30, -1e-30]])
    gate_up = np.concatenate([gate, np.ones_like(gate)])[None].astype(np.float32)
    got = kernels.swiglu(pool, gate_up, isa)[0].astype(np.float64)
    g = gate_up[0, :gate.size].astype(np.float64)
    with np.errstate(over="ignore"):
        exact = g / (1.0 + np.exp(-g))
    # Below g = -88 silu is below 1e-36 in size, and 0 here.
    assert np.all(np.abs(got - exact) <= 4 * EPS32 * np.abs(exact) + 1e-35)
    assert np.all(got[g < -88.0] == 0.0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [1, 17, 576, 2049])
def test_cosine_score(isa, dim) -> None:
    rng = np.random.default_rng(dim)
    a = rng.standard_normal(dim).astype(np.float32)
    b = (a + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    got = kernels.cosine(a, b, isa)
    ad, bd = a.astype(np.float64), b.astype(np.float64)
    exact = ad @ bd / np.sqrt((ad @ ad) * (bd @ bd))
    assert abs(got - exact) <= 4 * dim * EPS32
    assert kernels.cosine(np.zeros(dim, np.float32), b, isa) == 0.0  # a zero vector: 0


def test_bad_kernel_arguments_are_value_errors(pool) -> None:
    w = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="x must be"):
        kernels.linear(pool, w, "F32", None, np.zeros((2, 7), np.float32), None, ISAS[0])
    with pytest.raises(ValueError, match="unknown isa"):
        kernels.linear(pool, w, "F32", None, np.zeros((2, 8), np.float32), None, "sse9")
    with pytest.raises(ValueError, match="unsupported tensor type"):
        kernels.linear(pool, w, "int4", None, np.zeros((2, 8), np.float32), None, ISAS[0])
    q, cache = np.zeros((1, 4 * 8), np.float32), np.zeros((2, 5, 8), np.float32)
    for bad in ((q, cache, cache, -1, 4),  # a position before the cache
                (q, cache, cache, 5, 4),  # the query's position past the cache's end
                (q, cache, cache[:, :4], 0, 4),  # K and V caches of different shapes
                (q, cache, cache, 0, 3)):  # 3 query heads over 2 KV heads
        with pytest.raises(ValueError, match="attention shapes do not fit"):
            kernels.attention(pool, *bad, ISAS[0])
    with pytest.raises(ValueError, match="cache_type must be F32 or F16, got BF16"):
        kernels.attention(pool, q, cache, cache, 4, 4, ISAS[0], "BF16")
    assert kernels.attention(pool, q, cache, cache, 4, 4, ISAS[0]).shape == (1, 32)


# ---- quantised weights -------------------------------------------------------------------

gguf = pytest.importorskip("gguf")
from gguf_files import K_QUANTS, QUANTIZABLE, Q, quantized  # noqa: E402  (needs gguf)


@pytest.mark.parametrize("type_name", QUANTIZABLE + K_QUANTS)
def test_dequantize_equals_gguf(type_name) -> None:
    rng = np.random.default_rng(len(type_name))
    data = quantized(type_name, 3, 512, rng)
    want = gguf.quants.dequantize(data, Q[type_name]).reshape(-1)
    got = kernels.dequantize(data.reshape(-1), type_name, want.size)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def activation_error_bound(w: np.ndarray, x: np.ndarray, block: int) -> np.ndarray:
    """[n, out]: x quantised per block (32 elements, or 256 for the K-quants) to
    d * round(x / d), d = max|x| / 127, moves sum_i w_i x_i by at most
    sum_blocks d / 2 * sum_i |w_i|."""
    n, cols = x.shape
    d = np.abs(x.reshape(n, cols // block, block)).max(axis=2) / 127.0  # [n, blocks]
    w_abs = np.abs(w).reshape(w.shape[0], cols // block, block).sum(axis=2)  # [out, blocks]
    return (d / 2) @ w_abs.T


# (out, in, n): one block / super-block per row and many; decode, the 4-token tiles and tails.
QUANT_SHAPES = [(1, 256, 1), (7, 512, 1), (33, 256, 3), (20, 768, 9), (64, 1536, 1)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type_name", QUANTIZABLE + K_QUANTS)
@pytest.mark.parametrize("out_features, in_features, n", QUANT_SHAPES)
def test_quantized_linear(pool, isa, type_name, out_features, in_features, n) -> None:
    rng = np.random.default_rng(out_features * 31 + n)
    data = quantized(type_name, out_features, in_features, rng)
    w = gguf.quants.dequantize(data, Q[type_name]).reshape(out_features, in_features)
    w = w.astype(np.float64)
    x = (rng.standard_normal((n, in_features)) * rng.uniform(0.1, 3.0, (n, 1))).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    y0 = rng.standard_normal((n, out_features)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T
    block = 256 if type_name in K_QUANTS else 32
    bound = (activation_error_bound(w, x.astype(np.float64), block)
             + 4 * in_features * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-6)
    got = kernels.linear(pool, data, type_name, None, x, None, isa)
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / bound)
    got = kernels.linear(pool, data, type_name, bias, x, y0, isa)
    assert np.all(np.abs(got - (exact + bias + y0)) <= bound + 1e-5 * (1 + np.abs(y0)))


def test_quantized_kernels_agree_across_instruction_sets(pool) -> None:
    """The integer sums are exact, so the SIMD and plain kernels differ only in the order of
    fp32 additions."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    for type_name in QUANTIZABLE + K_QUANTS:
        data = quantized(type_name, 9, 512, rng)
        results = [kernels.linear(pool, data, type_name, None, x, None, isa) for isa in ISAS]
        for other in results[1:]:
            np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif("avx512" not in ISAS, reason="needs an AVX-512 CPU")
@pytest.mark.parametrize("type_name", QUANTIZABLE + K_QUANTS)
@pytest.mark.parametrize("out_features, n", [(1, 1), (9, 1), (7, 5), (13, 17), (11, 70)])
def test_avx512_quantized_kernels_equal_avx2_bit_for_bit(pool, type_name, out_features,
                                                         n) -> None:
    """AVX-512 VNNI's fused dot products (vpdpbusd, vpdpwssd) give the integer sums of AVX2's
    vpmaddubsw/vpmaddwd and each output's fp32 sums run in the same order whatever the tile,
    so the outputs are identical; rows and tokens leave tails of the wider AVX-512 tiles."""
    rng = np.random.default_rng(out_features * 7 + n)
    data = quantized(type_name, out_features, 512, rng)
    x = (rng.standard_normal((n, 512)) * 2.0).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    np.testing.assert_array_equal(kernels.linear(pool, data, type_name, bias, x, None, "avx512"),
                                  kernels.linear(pool, data, type_name, bias, x, None, "avx2"))


# Passes of up to kStepExactTokens (16) tokens give each token exactly what a one-token step
# gives: speculative verification relies on it for output identical to dense decoding.
STEP_EXACT_TOKENS = 16


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"] + QUANTIZABLE + K_QUANTS)
def test_passes_of_up_to_16_tokens_equal_one_token_steps(pool, isa, type_name) -> None:
    rng = np.random.default_rng(len(type_name))
    out_features, in_features = 70, 512
    if type_name in ("F32", "F16", "BF16"):
        data, _ = stored(rng.standard_normal((out_features, in_features)), type_name)
    else:
        data = quantized(type_name, out_features, in_features, rng)
    bias = rng.standard_normal(out_features).astype(np.float32)
    x = rng.standard_normal((STEP_EXACT_TOKENS, in_features)).astype(np.float32)
    steps = np.concatenate([kernels.linear(pool, data, type_name, bias, x[t:t + 1], None, isa)
                            for t in range(STEP_EXACT_TOKENS)])
    for n in range(2, STEP_EXACT_TOKENS + 1):  # every width of the last tile
        np.testing.assert_array_equal(
            kernels.linear(pool, data, type_name, bias, x[:n], None, isa), steps[:n],
            err_msg=f"{n} tokens")


def test_attention_does_not_depend_on_the_number_of_threads() -> None:
    """Chunks of keys are cut by position, and combined in position order, whatever thread
    computed them."""
    rng = np.random.default_rng(7)
    n, pos, heads, kv_heads, head_dim = 3, 700, 9, 3, 64
    q = rng.standard_normal((n, heads * head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((kv_heads, pos + n, head_dim)).astype(np.float32) for _ in "kv")
    one = kernels.attention(kernels.ThreadPool(1), q, k, v, pos, heads, ISAS[-1])
    for threads in (2, 3):
        many = kernels.attention(kernels.ThreadPool(threads), q, k, v, pos, heads, ISAS[-1])
        np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("cache_type", ["F32", "F16"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, pos, heads, kv_heads, head_dim",
                         [(5, 9, 4, 2, 64), (16, 9, 12, 2, 128), (16, 250, 9, 3, 64)])
def test_attention_of_up_to_16_queries_equals_one_query_steps(pool, isa, n, pos, heads, kv_heads,
                                                              head_dim, cache_type) -> None:
    rng = np.random.default_rng(n)
    q = rng.standard_normal((n, heads * head_dim)).astype(np.float32)
    k = rng.standard_normal((pos + n, kv_heads * head_dim)).astype(np.float32)
    v = rng.standard_normal((pos + n, kv_heads * head_dim)).astype(np.float32)
    k, v = (as_cache(heads_major(a, kv_heads), cache_type) for a in (k, v))
    got = kernels.attention(pool, q, k, v, pos, heads, isa, cache_type)
    for t in range(n):
        visible = pos + t + 1
        step = kernels.attention(pool, q[t:t + 1], k[:, :visible], v[:, :visible], pos + t, heads,
                                 isa, cache_type)
        np.testing.assert_array_equal(got[t:t + 1], step, err_msg=f"query {t}")
