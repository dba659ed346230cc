"""The CUDA backend's kernels one by one (``_core.cuda_kernels``) against NumPy and the CPU: the
decode GEMV over Q8_0, Q5_0, Q4_K and Q6_K blocks read in place (int8 activations, the CPU
backend's quantisation), in each output mode (store, accumulate = the fused residual add, SwiGLU
on stacked gate/up rows), with its skip flag set and unset, and with its RMSNorm prologue;
passes of several tokens (over blocks up to 8 run the block GEMV per token, more the weights
dequantised to the activation type a tile of rows at a time, then cuBLAS); the dequantisation
itself; the embedding lookup in dense and quantised tables, which also starts a decode step's
skip state; the kernels of a layer (RMSNorm, RoPE with the KV-cache write and the QKV GEMV that
does both in its epilogue, SwiGLU, decode attention in splits, prefill attention, FiRST's
router, the skip scores) and the logits head, on shapes whole-model tests miss (more than 8
query heads per KV head, head_dim above 128, odd widths, empty splits); with fp32, fp16 and bf16
activations. Without a GPU only the first test runs.

References: the blocks come from tests/gguf_files.py (``quantize`` for weights with a real
distribution, ``random_blocks`` for random bytes that reach every bit pattern) and the
weights they hold from gguf-py's NumPy dequantisation, in float64. Inputs are rounded to the
activation type (as the kernels' callers store them) before the reference is computed, so the
GEMV may differ from it only by fp32 arithmetic: n * eps32 * sum(|products|) for a sum of n
products, in any order (test_kernels.py). The block GEMV multiplies int8 activations, so its
reference takes the activations as the CPU backend quantises them (tests/int8_reference.py,
whose equality with the kernels' quantisation test_cuda_block_formats.py checks on the host);
its integer sums are exact. The prefill path also rounds each dequantised weight to the
activation type (its unit roundoff), SwiGLU rounds its output to it.
"""

from __future__ import annotations

import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext import _core
from ffnskip_ext.runtime.policies import FFNSkipPolicy, simulate_ffn_skip

gguf = pytest.importorskip("gguf")
from gguf_files import Q, quantize, quantized, random_blocks  # noqa: E402  (needs gguf)
from int8_reference import (  # noqa: E402
    ACTIVATION_BLOCK,
    activation_values,
    exact_weights,
    int8_product_bound,
)
from test_kernels import EPS32, attention_reference, stored  # noqa: E402

cuda = _core.cuda_kernels
needs_gpu = pytest.mark.skipif(
    not ffnskip_ext.cuda_available(), reason="no usable CUDA device or no CUDA build"
)

NATIVE = ["Q8_0", "Q5_0", "Q4_K", "Q6_K"]
K_QUANTS = {"Q4_K", "Q6_K"}
ACTIVATIONS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Unit roundoff of each activation type: rounding to it moves a value by at most this relatively.
ROUNDOFF = {"float32": EPS32 / 2, "float16": 2.0**-11, "bfloat16": 2.0**-8}
OUTPUTS = ["store", "accumulate", "swiglu"]
BLOCK_GEMV_MAX_TOKENS = 8  # quant_gemv.cuh's kBlockGemvMaxTokens


def shapes(type_name: str) -> list[tuple[int, int]]:
    """(outputs, cols): output counts that are not multiples of the warps of a thread block;
    one block per row, a few, and rows whose chunks take a warp several steps with a partial
    last one (chunks per block: 4 for the 32-element formats, 8 for Q4_K, 16 for Q6_K)."""
    if type_name in K_QUANTS:
        return [(1, 256), (7, 768), (33, 2304), (129, 1536)]
    return [(1, 32), (7, 96), (33, 544), (65, 2080), (129, 1536)]


def rounded(values: np.ndarray, activation: str) -> np.ndarray:
    """The values rounded to the activation type (nearest even, as the kernels' inputs), float64."""
    return stored(values.astype(np.float32), ACTIVATIONS[activation])[1]


def dequantized(data: np.ndarray, type_name: str) -> np.ndarray:
    """gguf-py's weights of the blocks [rows, row bytes], float32 [rows, cols]."""
    return gguf.quants.dequantize(data, Q[type_name]).astype(np.float32)


def problem(type_name: str, rows: int, cols: int, n: int, activation: str, seed: int):
    """(blocks, their weights [rows, cols], x [n, cols] in the activation type, bias, y0)."""
    rng = np.random.default_rng(seed)
    data = quantize(rng.standard_normal((rows, cols)), type_name)
    w = dequantized(data, type_name).astype(np.float64)
    # Outputs of order 10, far inside fp16's range even after SwiGLU.
    scale = 4.0 / np.sqrt(np.mean(np.sum(w * w, axis=1)) + 1e-30)
    x = rounded(rng.standard_normal((n, cols)) * scale, activation)
    bias = rng.standard_normal(rows).astype(np.float32)
    y0 = np.round(rng.standard_normal((n, rows)) * 8).astype(np.float32)  # exact in every type
    return data, w, x, bias, y0


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def check_output(got, w, x, bias, y0, output, activation, weight_roundoff: float = 0.0,
                 magnitude: np.ndarray | None = None) -> None:
    """got against the exact result of the output mode; weight_roundoff: the relative rounding
    of each weight on the device (the prefill's tiles); magnitude: the size of the terms each
    weight adds (exact_weights), |w| if None."""
    got = got.astype(np.float64)
    exact = x @ w.T + bias
    magnitude = np.abs(w) if magnitude is None else magnitude
    terms = np.abs(x) @ magnitude.T + np.abs(bias)  # sum of |products| and |bias|
    count = w.shape[1] + 1
    if output == "accumulate":
        exact, terms, count = exact + y0, terms + np.abs(y0), count + 1
    bound = (count * EPS32 + weight_roundoff) * terms + EPS32 * np.abs(exact) + 1e-30
    if output != "swiglu":
        err = np.abs(got - exact)
        assert np.all(err <= bound), np.max(err / bound)
        return
    half = w.shape[0] // 2
    gate, up = exact[:, :half], exact[:, half:]
    act = silu(gate) * up
    # |d silu(g) / dg| <= 1.1 and |silu(g)| <= |g|; twice the first-order error, fp32's exp
    # and products, and the rounding of act to the activation type.
    tolerance = (2 * (1.1 * np.abs(up) * bound[:, :half] + (np.abs(gate) + 1) * bound[:, half:])
                 + (8 * EPS32 + ROUNDOFF[activation]) * np.abs(act) + 1e-30)
    err = np.abs(got - act)
    assert np.all(err <= tolerance), np.max(err / tolerance)


def start_values(y0: np.ndarray, outputs: int, output: str) -> np.ndarray:
    """What y holds before the call: y0 for store and accumulate (store must overwrite it),
    zeros for SwiGLU."""
    return y0[:, :outputs] if output != "swiglu" else np.zeros((len(y0), outputs), np.float32)


# ---- without a GPU ----


def test_embedding_rule_without_decode_index_is_a_value_error() -> None:
    data = quantized("Q8_0", 2, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="give decode_index"):
        cuda.embedding(data, "Q8_0", np.zeros(1, np.int32), threshold=0.5)


@pytest.mark.skipif(ffnskip_ext.cuda_available(), reason="a CUDA device is usable here")
def test_cuda_kernels_without_device_raise_clear_value_error() -> None:
    data = quantized("Q8_0", 2, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        cuda.linear(data, "Q8_0", np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        cuda.dequantize(data, "Q8_0")
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        cuda.embedding(data, "Q8_0", np.zeros(1, np.int32))
    # The layer kernels share one entry point: the library has it (no "lacks ...").
    row = np.ones((1, 32), np.float32)
    for call in (lambda: cuda.rms_norm(row, row[0], 1e-5),
                 lambda: cuda.route(row, row[0], 1e-5, row[0], 0.0, 0.0),
                 lambda: cuda.cosine(row[0], row[0])):
        with pytest.raises(ValueError, match="device='cuda' is not available") as error:
            call()
        assert "lacks" not in str(error.value)


# ---- on a GPU ----


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("type_name", NATIVE)
def test_dequantize(type_name, activation) -> None:
    """The prefill's tiles: gguf-py's fp32 weights (the decoding's products are exact in fp32,
    so fused multiply-adds change nothing) rounded once to the activation type, bit for bit."""
    rows, cols = 37, 512
    data = random_blocks(type_name, rows, cols, np.random.default_rng(3))
    want = rounded(dequantized(data, type_name), activation)
    np.testing.assert_array_equal(cuda.dequantize(data, type_name, activation), want)


@needs_gpu
@pytest.mark.parametrize("type_name", NATIVE)
def test_embedding_lookup_in_quantized_table(type_name) -> None:
    rows, cols = 11, 768 if type_name in K_QUANTS else 96
    data = random_blocks(type_name, rows, cols, np.random.default_rng(4))
    ids = np.array([3, 0, 10, 3, 7], np.int32)  # repeats, first and last rows
    np.testing.assert_array_equal(cuda.embedding(data, type_name, ids),
                                  dequantized(data, type_name)[ids])


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_embedding_lookup_in_dense_table(activation) -> None:
    rng = np.random.default_rng(5)
    table = (3 * rng.standard_normal((13, 203))).astype(np.float32)
    ids = np.array([12, 0, 5, 5], np.int32)
    np.testing.assert_array_equal(cuda.embedding(table, "F32", ids, activation),
                                  rounded(table, activation)[ids])


@needs_gpu
@pytest.mark.parametrize("decode_index", [0, 3, 4, 5, 6, 7, 9, 40])
def test_decode_step_embedding_starts_the_token_as_the_cpu_rule(decode_index) -> None:
    """The skip state a decode step starts from, set by thread 0 of its embedding lookup: the
    CPU rule on saturated scores skips in each token that is not dense (warm-up, interval)."""
    policy = FFNSkipPolicy(threshold=0.5, max_skips_per_token=2, warmup_tokens=4,
                           full_token_interval=3, cold_start=0, cold_end=0)
    table = np.random.default_rng(6).standard_normal((7, 64)).astype(np.float32)
    ids = np.array([6], np.int32)
    rows, started = cuda.embedding(table, "F32", ids, "float32", decode_index,
                                   **policy.engine_args(6))
    np.testing.assert_array_equal(rows, table[ids])
    cpu_skips = simulate_ffn_skip(policy, np.ones((1, 6)), decode_index).any()
    assert started["dense_token"] == (0 if cpu_skips else 1)
    assert (started["budget"], started["in_run"]) == (2, 0)
    assert np.isnan(started["prev_score"])


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("type_name", NATIVE)
def test_gemv(type_name, output, activation) -> None:
    """Against the int8 activations the CPU backend would make of x."""
    for outputs, cols in shapes(type_name):
        rows = 2 * outputs if output == "swiglu" else outputs
        data, _, x, bias, y0 = problem(type_name, rows, cols, 1, activation, seed=outputs + cols)
        w, magnitude = exact_weights(data, type_name)
        xq = activation_values(x.astype(np.float32), ACTIVATION_BLOCK[type_name])
        y_start = start_values(y0, outputs, output)
        for b in (None, bias):
            got = cuda.linear(data, type_name, x.astype(np.float32), bias=b, y0=y_start,
                              activation=activation, output=output)
            check_output(got, w, xq, 0.0 if b is None else b, y_start, output, activation,
                         magnitude=magnitude)


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("type_name", NATIVE)
def test_gemv_skip_flag_writes_nothing(type_name, output, activation) -> None:
    outputs, cols = shapes(type_name)[2]
    rows = 2 * outputs if output == "swiglu" else outputs
    data, _, x, bias, y0 = problem(type_name, rows, cols, 1, activation, seed=9)
    y_start = y0[:, :outputs]  # not zeros, so that a write shows
    got = cuda.linear(data, type_name, x.astype(np.float32), bias=bias, y0=y_start,
                      activation=activation, output=output, skip=True)
    np.testing.assert_array_equal(got, y_start)


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("type_name", [*NATIVE, "F32"])
def test_gemv_with_rms_norm_prologue_equals_norm_then_gemv(type_name, output, activation) -> None:
    """The decode step folds the RMSNorm before the QKV and gate/up GEMVs into their prologue:
    the output equals the norm kernel followed by the plain GEMV bit for bit (the same sums in
    the same order), on block formats and dense weights (odd widths: the element-wise path),
    with the skip flag honoured."""
    dense_shapes = [(1, 8), (7, 203), (33, 2048), (65, 4100)]
    for outputs, cols in dense_shapes if type_name == "F32" else shapes(type_name):
        rows = 2 * outputs if output == "swiglu" else outputs
        rng = np.random.default_rng(rows * 7 + cols)
        if type_name == "F32":
            data = rng.standard_normal((rows, cols)).astype(np.float32) / np.sqrt(cols)
        else:
            data = quantize(rng.standard_normal((rows, cols)), type_name)
        residual = (rng.standard_normal((1, cols)) * 5).astype(np.float32)
        norm_weight = (rng.standard_normal(cols) + 1).astype(np.float32)
        bias = rng.standard_normal(rows).astype(np.float32)
        y0 = start_values(np.round(rng.standard_normal((1, rows)) * 8).astype(np.float32),
                          outputs, output)
        normed = cuda.rms_norm(residual, norm_weight, 1e-6, activation)
        expected = cuda.linear(data, type_name, normed, bias=bias, y0=y0, activation=activation,
                               output=output)
        got = cuda.linear(data, type_name, residual, bias=bias, y0=y0, activation=activation,
                          output=output, norm_weight=norm_weight, norm_eps=1e-6)
        np.testing.assert_array_equal(got, expected)
        skipped = cuda.linear(data, type_name, residual, bias=bias, y0=y0 + 1,
                              activation=activation, output=output, norm_weight=norm_weight,
                              skip=True)
        np.testing.assert_array_equal(skipped, y0 + 1)


@needs_gpu
def test_gemv_refuses_inputs_wider_than_shared_memory() -> None:
    cols = 11776 + 32  # fp32: one pack beyond the staged input's 46 KiB
    w = np.zeros((1, cols), np.float32)
    x = np.ones((1, cols), np.float32)
    with pytest.raises(ValueError, match="shared memory"):
        cuda.linear(w, "F32", x, activation="float32", norm_weight=np.ones(cols, np.float32))
    with pytest.raises(ValueError, match="GEMV opens"):
        cuda.linear(w, "F32", x, activation="float32", gemv=False,
                    norm_weight=np.ones(cols, np.float32))
    cols = 256 * 158  # Q4_K: its int8 activations, scales and sums per 16 take 51192 bytes
    data = quantized("Q4_K", 1, cols, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shared memory"):
        cuda.linear(data, "Q4_K", np.ones((1, cols), np.float32), activation="float32")


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("type_name", NATIVE)
def test_prefill_linear(type_name, output, activation) -> None:
    """n tokens of a pass: up to BLOCK_GEMV_MAX_TOKENS through the block GEMV on each token's
    int8 activations, more through the dequantised tiles and cuBLAS (one tile for the whole
    matrix, and tiles of 3 rows: several, the last one short)."""
    outputs, cols = shapes(type_name)[1]
    rows = 2 * outputs if output == "swiglu" else outputs
    for n in (1, 5, BLOCK_GEMV_MAX_TOKENS, BLOCK_GEMV_MAX_TOKENS + 1, 37):
        data, w, x, bias, y0 = problem(type_name, rows, cols, n, activation, seed=n)
        y_start = start_values(y0, outputs, output)
        for tile_elements in (0, 3 * cols):
            got = cuda.linear(data, type_name, x.astype(np.float32), bias=bias, y0=y_start,
                              activation=activation, output=output, gemv=False,
                              tile_elements=tile_elements)
            if n <= BLOCK_GEMV_MAX_TOKENS:
                exact, magnitude = exact_weights(data, type_name)
                xq = activation_values(x.astype(np.float32), ACTIVATION_BLOCK[type_name])
                check_output(got, exact, xq, bias, y_start, output, activation,
                             magnitude=magnitude)
            else:
                check_output(got, w, x, bias, y_start, output, activation,
                             weight_roundoff=ROUNDOFF[activation])


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("output", ["store", "accumulate"])
@pytest.mark.parametrize("type_name", NATIVE)
def test_pass_of_a_few_tokens_equals_decode_gemvs(type_name, output, activation) -> None:
    """A pass of up to BLOCK_GEMV_MAX_TOKENS tokens over blocks (a speculative verification)
    gives each token the decode GEMV's result bit for bit: the same int8 activations, the same
    sums in the same order."""
    outputs, cols = shapes(type_name)[2]
    n = BLOCK_GEMV_MAX_TOKENS
    data, _, x, bias, y0 = problem(type_name, outputs, cols, n, activation, seed=3)
    x = x.astype(np.float32)
    passed = cuda.linear(data, type_name, x, bias=bias, y0=y0, activation=activation,
                         output=output, gemv=False)
    steps = np.concatenate([
        cuda.linear(data, type_name, x[t:t + 1], bias=bias, y0=y0[t:t + 1],
                    activation=activation, output=output) for t in range(n)])
    np.testing.assert_array_equal(passed, steps)


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_dense_gemv_and_prefill(activation) -> None:
    """The dense kernels behind the same entry point (float32 weights rounded to the activation
    type on the way in)."""
    rng = np.random.default_rng(8)
    rows, cols = 9, 200
    w = rounded(rng.standard_normal((rows, cols)), activation)
    x = rounded(rng.standard_normal((1, cols)), activation)
    bias = rng.standard_normal(rows).astype(np.float32)
    for gemv in (True, False):
        got = cuda.linear(w.astype(np.float32), "F32", x.astype(np.float32), bias=bias,
                          activation=activation, gemv=gemv)
        check_output(got, w, x, bias, None, "store", activation)


@needs_gpu
def test_bad_calls_are_value_errors() -> None:
    q4_0 = quantized("Q4_0", 2, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not read in place"):
        cuda.linear(q4_0, "Q4_0", np.zeros((1, 32), np.float32))
    q8 = quantized("Q8_0", 2, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="one token"):
        cuda.linear(q8, "Q8_0", np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="skip flag"):
        cuda.linear(q8, "Q8_0", np.zeros((2, 32), np.float32), gemv=False, skip=True)
    with pytest.raises(ValueError, match="out of range"):
        cuda.embedding(q8, "Q8_0", np.array([2], np.int32))


# ---- the kernels of a layer and of the head ----
#
# Inputs the kernels read in the activation type are rounded to it first, so the references
# (float64) see what the kernels see. Outputs stored in that type carry its unit roundoff, and
# in fp16 below its normal range an absolute half-spacing of the subnormals.

TINY = {"float32": 0.0, "float16": 2.0**-25, "bfloat16": 0.0}

kernels = _core.kernels  # the CPU's, for the references that must be its arithmetic


def assert_within(got: np.ndarray, exact: np.ndarray, bound: np.ndarray) -> None:
    err = np.abs(np.asarray(got, np.float64) - exact)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
        f"(got {np.asarray(got)[worst]}, exact {exact[worst]})")


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("n, dim", [(1, 1), (3, 203), (2, 4096), (1, 8195)])
def test_rms_norm(n, dim, activation) -> None:
    """One block per row; widths below, between and above the 256 threads' strides."""
    rng = np.random.default_rng(dim + n)
    x = (rng.standard_normal((n, dim)) * 3).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    got = cuda.rms_norm(x, w, 1e-5, activation)
    xd = x.astype(np.float64)
    exact = w * (xd / np.sqrt((xd * xd).mean(axis=1, keepdims=True) + 1e-5))
    bound = ((dim + 4) * EPS32 + ROUNDOFF[activation]) * np.abs(exact) + TINY[activation]
    assert_within(got, exact, bound + 1e-30)


def rope_reference(v: np.ndarray, heads: int, head_dim: int, pos: int, inv_freq: np.ndarray,
                   interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """(v [n, heads * head_dim] rotated, |x0| + |x1| of each element's pair), float64, with the
    kernel's fp32 angle inv_freq * position."""
    n = v.shape[0]
    angle = inv_freq[None, :] * np.arange(pos, pos + n, dtype=np.float32)[:, None]  # fp32
    cos, sin = (f(angle.astype(np.float64))[:, None, :] for f in (np.cos, np.sin))
    x = v.astype(np.float64).reshape(n, heads, head_dim)
    half = head_dim // 2
    first, second = ((slice(0, None, 2), slice(1, None, 2)) if interleaved
                     else (slice(0, half), slice(half, None)))
    x0, x1 = x[..., first], x[..., second]
    out, magnitude = np.empty_like(x), np.empty_like(x)
    out[..., first], out[..., second] = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    magnitude[..., first] = magnitude[..., second] = np.abs(x0) + np.abs(x1)
    return out.reshape(n, -1), magnitude.reshape(n, -1)


# (num_heads, kv_heads, head_dim, n, pos, interleaved, rotate_q): GQA, head_dim 256 at a far
# position, llama.cpp's interleaved pairs with an odd half, K/V only (a layer reduced to it).
ROPE_SHAPES = [(4, 2, 64, 3, 0, False, True), (6, 2, 256, 2, 4000, False, True),
               (3, 1, 18, 5, 7, True, True), (4, 4, 32, 2, 9, False, False)]


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("heads, kv_heads, head_dim, n, pos, interleaved, rotate_q", ROPE_SHAPES)
def test_rope_and_kv_write(heads, kv_heads, head_dim, n, pos, interleaved, rotate_q,
                           activation) -> None:
    rng = np.random.default_rng(head_dim + pos)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    qkv = rng.standard_normal((n, q_dim + 2 * kv_dim)).astype(np.float32)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    rows = pos + n + 2  # rows before and after the pass's, which must stay as they are
    k0 = np.round(rng.standard_normal((rows, kv_dim)) * 8).astype(np.float32)  # exact in bf16
    v0 = np.round(rng.standard_normal((rows, kv_dim)) * 8).astype(np.float32)
    q_out, k_out, v_out = cuda.rope(qkv, pos, heads, kv_heads, head_dim, inv_freq, k0, v0,
                                    rotate_q=rotate_q, interleaved=interleaved,
                                    activation=activation)
    np.testing.assert_array_equal(q_out[:, q_dim:], qkv[:, q_dim:])  # K/V read, not rotated
    if rotate_q:
        exact, magnitude = rope_reference(qkv[:, :q_dim], heads, head_dim, pos, inv_freq,
                                          interleaved)
        # cosf/sinf within 2 ulp, then two products and a sum in fp32.
        assert_within(q_out[:, :q_dim], exact, 8 * EPS32 * magnitude + 1e-30)
    else:
        np.testing.assert_array_equal(q_out[:, :q_dim], qkv[:, :q_dim])
    exact, magnitude = rope_reference(qkv[:, q_dim:q_dim + kv_dim], kv_heads, head_dim, pos,
                                      inv_freq, interleaved)
    bound = 8 * EPS32 * magnitude + ROUNDOFF[activation] * np.abs(exact) + TINY[activation]
    assert_within(k_out[pos:pos + n], exact, bound + 1e-30)
    np.testing.assert_array_equal(v_out[pos:pos + n],
                                  rounded(qkv[:, q_dim + kv_dim:], activation))
    others = np.r_[0:pos, pos + n:rows]
    np.testing.assert_array_equal(k_out[others], k0[others])
    np.testing.assert_array_equal(v_out[others], v0[others])

    # A skipped layer's: nothing rotated, nothing written.
    q_skip, k_skip, v_skip = cuda.rope(qkv, pos, heads, kv_heads, head_dim, inv_freq, k0, v0,
                                       rotate_q=rotate_q, interleaved=interleaved, skip=True,
                                       activation=activation)
    np.testing.assert_array_equal(q_skip, qkv)
    np.testing.assert_array_equal(k_skip, k0)
    np.testing.assert_array_equal(v_skip, v0)


# (heads, kv_heads, head_dim, interleaved, rotate_q, split_head): GQA; a weight split into two
# segments (a mixed-type checkpoint's) at the k rows and inside the q rows; llama.cpp's pairs;
# K/V only (early exit), whole and split between k and v.
FUSED_ROPE_SHAPES = [(4, 2, 64, False, True, 0), (4, 2, 64, False, True, 4),
                     (6, 2, 128, True, True, 3), (4, 4, 32, False, False, 0),
                     (4, 4, 32, False, False, 4)]


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("type_name", ["F32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("heads, kv_heads, head_dim, interleaved, rotate_q, split_head",
                         FUSED_ROPE_SHAPES)
def test_qkv_gemv_with_rope_epilogue_equals_gemv_then_rope(
        heads, kv_heads, head_dim, interleaved, rotate_q, split_head, type_name,
        activation) -> None:
    """The decode step's QKV GEMV rotates q and k and writes the cache in its epilogue: the
    same values, bit for bit, as the GEMV followed by the RoPE kernel (the same sums, the same
    rounding of each product); a set skip flag writes nothing."""
    rng = np.random.default_rng(head_dim * 10 + split_head)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    first = 0 if rotate_q else q_dim
    rows, cols = q_dim + 2 * kv_dim - first, 203 if type_name == "F32" else 256
    w = rng.standard_normal((rows, cols)) / np.sqrt(cols)
    data = w.astype(np.float32) if type_name == "F32" else quantize(w, type_name)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    pos, cache_rows = 37, 40
    k0 = np.round(rng.standard_normal((cache_rows, kv_dim)) * 8).astype(np.float32)
    v0 = np.round(rng.standard_normal((cache_rows, kv_dim)) * 8).astype(np.float32)
    qkv0 = rng.standard_normal((1, q_dim + 2 * kv_dim)).astype(np.float32)

    qkv = qkv0.copy()
    qkv[:, first:] = cuda.linear(data, type_name, x, bias=bias, activation=activation)
    q_ref, k_ref, v_ref = cuda.rope(qkv, pos, heads, kv_heads, head_dim, inv_freq, k0, v0,
                                    rotate_q=rotate_q, interleaved=interleaved,
                                    activation=activation)
    fused = dict(rotate_q=rotate_q, interleaved=interleaved, activation=activation,
                 weight=data, weight_type=type_name, x=x[0], bias=bias,
                 split_row=split_head * head_dim)
    q_got, k_got, v_got = cuda.rope(qkv0, pos, heads, kv_heads, head_dim, inv_freq, k0, v0,
                                    **fused)
    np.testing.assert_array_equal(q_got[:, :q_dim], q_ref[:, :q_dim] if rotate_q
                                  else qkv0[:, :q_dim])
    np.testing.assert_array_equal(q_got[:, q_dim:], qkv0[:, q_dim:])  # K/V go to the cache only
    np.testing.assert_array_equal(k_got, k_ref)
    np.testing.assert_array_equal(v_got, v_ref)

    q_skip, k_skip, v_skip = cuda.rope(qkv0, pos, heads, kv_heads, head_dim, inv_freq, k0, v0,
                                       skip=True, **fused)
    np.testing.assert_array_equal(q_skip, qkv0)
    np.testing.assert_array_equal(k_skip, k0)
    np.testing.assert_array_equal(v_skip, v0)


@needs_gpu
def test_qkv_gemv_with_rope_epilogue_refuses_rows_off_head_boundaries() -> None:
    head_dim, cols = 64, 32
    rows = 3 * head_dim  # one head each of q, k and v
    w = np.zeros((rows, cols), np.float32)
    zeros = np.zeros((2, head_dim), np.float32)
    inv_freq = np.ones(head_dim // 2, np.float32)
    with pytest.raises(ValueError, match="whole heads"):
        cuda.rope(np.zeros((1, rows), np.float32), 0, 1, 1, head_dim, inv_freq, zeros, zeros,
                  weight=w, x=np.zeros(cols, np.float32), split_row=head_dim // 2)


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("n, inter", [(1, 1), (3, 203), (2, 1537), (5, 4096)])
def test_swiglu(n, inter, activation) -> None:
    rng = np.random.default_rng(inter + n)
    gate_up = (rng.standard_normal((n, 2 * inter)) * 4).astype(np.float32)
    got = cuda.swiglu(gate_up, activation=activation)
    g, u = gate_up[:, :inter].astype(np.float64), gate_up[:, inter:].astype(np.float64)
    exact = g / (1.0 + np.exp(-g)) * u
    bound = (8 * EPS32 + ROUNDOFF[activation]) * np.abs(exact) + TINY[activation]
    assert_within(got, exact, bound + 1e-30)
    act0 = np.round(rng.standard_normal((n, inter)) * 8).astype(np.float32)
    np.testing.assert_array_equal(cuda.swiglu(gate_up, act0=act0, skip=True,
                                              activation=activation), act0)


def attention_bound(magnitude: np.ndarray, exact: np.ndarray, head_dim: int, keys: int,
                    activation: str) -> np.ndarray:
    """test_kernels.py's bound on fp32 attention (scores of head_dim-term sums, amplified by
    at most |score| through exp; a weighted sum over the keys), a few more eps for the splits'
    combine, and the rounding of the output to the activation type."""
    scale = np.sqrt(head_dim) * 4.0
    return ((head_dim * scale + keys + 16) * EPS32 * (magnitude + 1e-3)
            + ROUNDOFF[activation] * np.abs(exact) + TINY[activation])


def attention_cache(rng: np.random.Generator, rows: int, used: int, kv_dim: int,
                    activation: str) -> tuple[np.ndarray, np.ndarray]:
    """K and V caches [rows, kv_dim] rounded to the activation type; rows from `used` on are
    large, so that reading a row the token does not see shows."""
    k = rng.standard_normal((rows, kv_dim))
    v = rng.standard_normal((rows, kv_dim))
    k[used:] *= 50
    v[used:] *= 50
    return (rounded(k, activation).astype(np.float32),
            rounded(v, activation).astype(np.float32))


# (num_heads, kv_heads, head_dim, pos, splits): one position; more than 8 q heads per KV head
# (12, 10: a second, partial block of heads); head_dim 80 and 256; more splits than the
# positions fill (splits hold at least 64 positions: empty splits); splits of several rounds,
# the last one partial (701 positions in 3); MHA. V is read 4 values per lane where head_dim
# is a multiple of 4, in key slots of 128 / (head_dim / 4) lanes (80: 6 slots and 8 idle
# lanes; 256: 2 slots); head_dim 66 reads one value of every key per lane.
DECODE_ATTENTION_SHAPES = [(4, 4, 64, 0, 1), (12, 1, 128, 100, 3), (24, 2, 80, 70, 5),
                           (16, 16, 256, 40, 2), (8, 2, 64, 4, 8), (9, 3, 64, 37, 2),
                           (40, 4, 96, 300, 16), (8, 2, 128, 700, 3), (6, 2, 66, 90, 2)]


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("heads, kv_heads, head_dim, pos, splits", DECODE_ATTENTION_SHAPES)
def test_decode_attention(heads, kv_heads, head_dim, pos, splits, activation) -> None:
    rng = np.random.default_rng(heads * 1000 + pos)
    q = rng.standard_normal(heads * head_dim).astype(np.float32)
    k, v = attention_cache(rng, pos + 3, pos + 1, kv_heads * head_dim, activation)
    got = cuda.decode_attention(q, k, v, pos, heads, kv_heads, head_dim, num_splits=splits,
                                activation=activation)
    exact, magnitude = attention_reference(q[None, :], k, v, pos, heads, kv_heads, head_dim)
    bound = attention_bound(magnitude[0], exact[0], head_dim, pos + 1, activation)
    assert_within(got, exact[0], bound)
    out0 = np.round(rng.standard_normal(heads * head_dim) * 8).astype(np.float32)
    skipped = cuda.decode_attention(q, k, v, pos, heads, kv_heads, head_dim, num_splits=splits,
                                    out0=out0, skip=True, activation=activation)
    np.testing.assert_array_equal(skipped, out0)


# (n, pos, heads, kv_heads, head_dim): one token; a partial last tile of 16 queries; head_dim
# above 128 (160, 256: the kernel's larger shared-memory carve-out) and not a multiple of 32
# (130); 12 q heads per KV head.
PREFILL_ATTENTION_SHAPES = [(1, 0, 4, 4, 64), (37, 0, 6, 2, 64), (20, 50, 8, 2, 160),
                            (17, 5, 4, 1, 256), (33, 40, 12, 1, 72), (5, 3, 3, 3, 130)]


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("n, pos, heads, kv_heads, head_dim", PREFILL_ATTENTION_SHAPES)
def test_prefill_attention(n, pos, heads, kv_heads, head_dim, activation) -> None:
    rng = np.random.default_rng(n * 100 + head_dim)
    q = rng.standard_normal((n, heads * head_dim)).astype(np.float32)
    k, v = attention_cache(rng, pos + n + 2, pos + n, kv_heads * head_dim, activation)
    got = cuda.prefill_attention(q, k, v, pos, heads, kv_heads, head_dim, activation=activation)
    exact, magnitude = attention_reference(q, k, v, pos, heads, kv_heads, head_dim)
    assert_within(got, exact, attention_bound(magnitude, exact, head_dim, pos + n, activation))


@needs_gpu
@pytest.mark.parametrize("n, hidden", [(1, 64), (3, 203), (7, 4096), (512, 576)])
def test_router_logit_and_gate(n, hidden) -> None:
    rng = np.random.default_rng(n + hidden)
    x = (rng.standard_normal((n, hidden)) * 2).astype(np.float32)
    norm_weight = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    weight = (rng.standard_normal(hidden) / np.sqrt(hidden)).astype(np.float32)
    bias = 0.3
    xd = x.astype(np.float64)
    normed = norm_weight * xd / np.sqrt((xd * xd).mean(axis=1, keepdims=True) + 1e-5)
    mean = normed.mean(axis=0)
    logit = weight @ mean + bias
    # The norm (hidden-term sums), the mean (n terms), the dot (hidden terms), then expf.
    logit_error = (2 * hidden + n + 8) * EPS32 * (np.abs(weight) @ np.abs(normed).mean(axis=0)
                                                  + abs(bias))
    for threshold, off in ((logit - 2 * logit_error - 1e-6, False),
                           (logit + 2 * logit_error + 1e-6, True)):
        got_off, gate = cuda.route(x, norm_weight, 1e-5, weight, bias, threshold)
        assert got_off == off
        assert abs(gate - 1 / (1 + np.exp(-logit))) <= logit_error / 4 + 4 * EPS32


@needs_gpu
@pytest.mark.parametrize("n", [1, 3, 7])
def test_router_mean_is_the_cpu_backends_bit_for_bit(n) -> None:
    """FiRST decides as the CPU backend: the mean of the input norm's fp32 rows (the CPU's
    rms_norm), summed in token order and divided by n. Integer inputs make the norms' sums of
    squares exact in any order, so the CPU's rows are the kernel's bit for bit; a one-hot
    router makes the logit that mean's column, and thresholds on either side of it in fp32
    must flip the decision (rows rounded to 16 bits, or a product with 1/n, would not)."""
    rng = np.random.default_rng(n)
    hidden, eps = 203, 2.0**-10
    x = rng.integers(-8, 9, (n, hidden)).astype(np.float32)
    norm_weight = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    rows = kernels.rms_norm(x, norm_weight, eps)  # the CPU backend's input norm
    column_sums = np.zeros(hidden, np.float32)
    for t in range(n):
        column_sums += rows[t]  # the CPU backend's axpy, token by token
    mean = column_sums / np.float32(n)
    for j in rng.choice(hidden, 12, replace=False):
        one_hot = np.zeros(hidden, np.float32)
        one_hot[j] = 1.0
        value = mean[j]
        above = np.nextafter(value, np.float32(np.inf), dtype=np.float32)
        assert cuda.route(x, norm_weight, eps, one_hot, 0.0, value)[0] is False  # kept
        assert cuda.route(x, norm_weight, eps, one_hot, 0.0, above)[0] is True  # routed off


@needs_gpu
@pytest.mark.parametrize("hidden", [1, 17, 4096, 8191])
def test_residual_add_score(hidden) -> None:
    """x += ffn_out (fp32, exact as NumPy's) and the saturation score cos(x, x + ffn_out),
    clamped as the skip state records it; 0 for a zero vector; nothing when skipped."""
    rng = np.random.default_rng(hidden)
    x = rng.standard_normal(hidden).astype(np.float32)
    ffn_out = (0.3 * rng.standard_normal(hidden)).astype(np.float32)
    x_out, score = cuda.residual_add_score(x, ffn_out)
    after = x + ffn_out
    np.testing.assert_array_equal(x_out, after)
    a, b = x.astype(np.float64), after.astype(np.float64)
    assert abs(score - a @ b / np.sqrt((a @ a) * (b @ b))) <= 4 * hidden * EPS32
    unchanged = cuda.residual_add_score(x, np.zeros_like(x))[1]
    assert 1.0 - 4 * hidden * EPS32 <= unchanged <= 1.0  # clamped at 1
    assert cuda.residual_add_score(x, -x)[1] == 0.0  # x + ffn_out = 0
    x_skip, score_skip = cuda.residual_add_score(x, ffn_out, skip=True, score0=0.25)
    np.testing.assert_array_equal(x_skip, x)
    assert score_skip == 0.25


@needs_gpu
@pytest.mark.parametrize("hidden", [1, 17, 4096, 8191])
def test_layer_cosine(hidden) -> None:
    rng = np.random.default_rng(hidden + 1)
    a = rng.standard_normal(hidden).astype(np.float32)
    b = (a + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    ad, bd = a.astype(np.float64), b.astype(np.float64)
    assert abs(cuda.cosine(a, b) - ad @ bd / np.sqrt((ad @ ad) * (bd @ bd))) <= 4 * hidden * EPS32
    assert cuda.cosine(np.zeros_like(a), b) == 0.0
    assert np.isnan(cuda.cosine(a, b, skip=True))


def logits_check(got: np.ndarray, w: np.ndarray, x: np.ndarray, final_norm: np.ndarray,
                 activation: str) -> None:
    """The head against float64: the norm's error and the rounding of the normed row to the
    activation type (relative, plus fp16's subnormal spacing) carried through the GEMV, the
    GEMV's own fp32 sums."""
    xd = x.astype(np.float64)
    normed = final_norm * xd / np.sqrt(np.mean(xd * xd) + 1e-5)
    exact = w @ normed
    hidden = len(x)
    terms = np.abs(w) @ np.abs(normed)
    bound = (((2 * hidden + 8) * EPS32 + ROUNDOFF[activation]) * terms
             + TINY[activation] * np.abs(w).sum(axis=1) + EPS32 * np.abs(exact) + 1e-30)
    assert_within(got, exact, bound)


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("vocab, hidden", [(1, 64), (1001, 203), (515, 256), (5, 23557)])
def test_logits_dense(vocab, hidden, activation) -> None:
    """Widths of whole 16-byte packs (64, 256) and not (203: the GEMV's element-wise path); the
    norm in the GEMV's prologue, except for a row wider than it stages in any activation type
    (23557): the norm kernel first."""
    rng = np.random.default_rng(vocab + hidden)
    w = rounded(rng.standard_normal((vocab, hidden)) / np.sqrt(hidden), activation)
    x = (3 * rng.standard_normal(hidden)).astype(np.float32)
    final_norm = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    got = cuda.logits(x, final_norm, 1e-5, w.astype(np.float32), "F32", activation)
    logits_check(got, w, x, final_norm, activation)


@needs_gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("type_name", NATIVE)
def test_logits_over_blocks(type_name, activation) -> None:
    """An LM head held in a block format (a tied Q8_0/Q4_K/Q6_K embedding table, say): the norm
    kernel's row (which the prologue equals bit for bit) as int8 activations, times the blocks."""
    rng = np.random.default_rng(len(type_name))
    vocab, hidden = 777, 512 if type_name in K_QUANTS else 96
    data = quantize(rng.standard_normal((vocab, hidden)) / np.sqrt(hidden), type_name)
    x = (3 * rng.standard_normal(hidden)).astype(np.float32)
    final_norm = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    got = cuda.logits(x, final_norm, 1e-5, data, type_name, activation)
    normed = cuda.rms_norm(x[None], final_norm, 1e-5, activation)
    xq = activation_values(normed, ACTIVATION_BLOCK[type_name])
    w, magnitude = exact_weights(data, type_name)
    exact = (xq @ w.T)[0]
    assert_within(got, exact, int8_product_bound(magnitude, xq)[0] + EPS32 * np.abs(exact))


@needs_gpu
def test_bad_layer_kernel_calls_are_value_errors() -> None:
    q = np.zeros(2 * 300, np.float32)
    cache = np.zeros((4, 300), np.float32)
    with pytest.raises(ValueError, match="attention: bad shape"):  # head_dim above 256
        cuda.decode_attention(q, cache, cache, 3, 2, 1, 300)
    with pytest.raises(ValueError, match="attention: bad shape"):  # the cache ends before pos
        cuda.decode_attention(q[:128], cache[:, :64], cache[:, :64], 4, 2, 1, 64)
    rows = np.ones((513, 8), np.float32)
    with pytest.raises(ValueError, match="router averages"):
        cuda.route(rows, rows[0], 1e-5, rows[0], 0.0, 0.0)
