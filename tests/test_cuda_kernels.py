"""The CUDA backend's kernels one by one (``_core.cuda_kernels``) against NumPy: the decode GEMV
over Q8_0, Q5_0, Q4_K and Q6_K blocks read in place, in each output mode (store, accumulate =
the fused residual add, SwiGLU on stacked gate/up rows), with its skip flag set and unset; the
prefill path (weights dequantised to the activation type a tile of rows at a time, then
cuBLAS); the dequantisation itself and the embedding lookup in a quantised table; with fp32,
fp16 and bf16 activations. Without a GPU only the first test runs.

References: the blocks come from tests/gguf_files.py (``quantize`` for weights with a real
distribution, ``random_blocks`` for random bytes that reach every bit pattern) and the
weights they hold from gguf-py's NumPy dequantisation, in float64. Inputs are rounded to the
activation type (as the kernels' callers store them) before the reference is computed, so the
GEMV may differ from it only by fp32 arithmetic: n * eps32 * sum(|products|) for a sum of n
products, in any order (test_kernels.py). The prefill path also rounds each dequantised weight
to the activation type (its unit roundoff), SwiGLU rounds its output to it.
"""

from __future__ import annotations

import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext import _core

gguf = pytest.importorskip("gguf")
from gguf_files import Q, quantize, quantized, random_blocks  # noqa: E402  (needs gguf)
from test_kernels import EPS32, stored  # noqa: E402

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


def shapes(type_name: str) -> list[tuple[int, int]]:
    """(outputs, cols): output counts that are not multiples of the warps of a thread block;
    one block per row, a few, and rows whose chunks take a warp several steps with a partial
    last one (32-element formats: 4 chunks per block, K-quants 16)."""
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


def check_output(got, w, x, bias, y0, output, activation, weight_roundoff: float = 0.0) -> None:
    """got against the exact result of the output mode; weight_roundoff: the relative rounding
    of each weight on the device (the prefill's tiles)."""
    got = got.astype(np.float64)
    exact = x @ w.T + bias
    terms = np.abs(x) @ np.abs(w).T + np.abs(bias)  # sum of |products| and |bias|
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


@pytest.mark.skipif(ffnskip_ext.cuda_available(), reason="a CUDA device is usable here")
def test_cuda_kernels_without_device_raise_clear_value_error() -> None:
    data = quantized("Q8_0", 2, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        cuda.linear(data, "Q8_0", np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        cuda.dequantize(data, "Q8_0")
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        cuda.embedding(data, "Q8_0", np.zeros(1, np.int32))


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
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("type_name", NATIVE)
def test_gemv(type_name, output, activation) -> None:
    for outputs, cols in shapes(type_name):
        rows = 2 * outputs if output == "swiglu" else outputs
        data, w, x, bias, y0 = problem(type_name, rows, cols, 1, activation, seed=outputs + cols)
        y_start = start_values(y0, outputs, output)
        for b in (None, bias):
            got = cuda.linear(data, type_name, x.astype(np.float32), bias=b, y0=y_start,
                              activation=activation, output=output)
            check_output(got, w, x, 0.0 if b is None else b, y_start, output, activation)


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
@pytest.mark.parametrize("type_name", NATIVE)
def test_prefill_linear(type_name, output, activation) -> None:
    """n tokens through the dequantised tiles and cuBLAS: one tile for the whole matrix, and
    tiles of 3 rows (several, the last one short)."""
    outputs, cols = shapes(type_name)[1]
    rows = 2 * outputs if output == "swiglu" else outputs
    for n in (1, 5, 37):
        data, w, x, bias, y0 = problem(type_name, rows, cols, n, activation, seed=n)
        y_start = start_values(y0, outputs, output)
        for tile_elements in (0, 3 * cols):
            got = cuda.linear(data, type_name, x.astype(np.float32), bias=bias, y0=y_start,
                              activation=activation, output=output, gemv=False,
                              tile_elements=tile_elements)
            check_output(got, w, x, bias, y_start, output, activation,
                         weight_roundoff=ROUNDOFF[activation])


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
