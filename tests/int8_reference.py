"""References for the linears over GGUF blocks that multiply int8 activations (the CPU backend's
quantised kernels, the CUDA decode GEMV): the activations quantised as the CPU backend
quantises them (csrc/cpu/quant.cpp, quantize_block_scalar), the weights the blocks hold in
float64, and the error bound of a sum whose integer parts are exact."""

from __future__ import annotations

import gguf
import numpy as np

from gguf_files import Q
from test_kernels import EPS32

# Activations per scale: a block of a 32-element format, a super-block of a K-quant.
ACTIVATION_BLOCK = {"Q8_0": 32, "Q5_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_1": 32,
                    "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


def quantize_activations(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [..., cols] -> (q int8 [..., cols], scale float32 [..., cols / block], sums of q
    per 16 int32 [..., cols / 16]): amax = max |x| per block, q = round-to-even(x * (127 / amax))
    in fp32, scale = amax / 127."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(blocks).max(axis=-1)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inverse[..., None]).astype(np.int8).reshape(x.shape)
    scale = (amax / np.float32(127)).astype(np.float32)
    sums16 = q.reshape(*x.shape[:-1], -1, 16).astype(np.int32).sum(axis=-1)
    return q, scale, sums16


def activation_values(x: np.ndarray, block: int) -> np.ndarray:
    """The values the int8 activations of x stand for, scale * q, float64."""
    q, scale, _ = quantize_activations(x, block)
    return q.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=-1)


def exact_weights(data: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(w, magnitude) float64 [rows, cols]: the weights the blocks [rows, row bytes] hold, exactly,
    and the size of the terms an integer dot product adds for each: |w|, except for Q4_K, whose
    d * sc * q and dmin * m are summed apart (|d sc q| + |dmin m|: they may nearly cancel)."""
    def dequantized(blocks: np.ndarray) -> np.ndarray:
        return gguf.quants.dequantize(blocks, Q[type_name]).astype(np.float64)

    if type_name != "Q4_K":
        w = dequantized(data)
        return w, np.abs(w)
    blocks = data.reshape(data.shape[0], -1, 144)
    scaled, offset = blocks.copy(), blocks.copy()
    scaled[..., 2:4] = 0  # dmin = 0: d * sc * q, exact in fp32 (at most 21 bits)
    offset[..., 16:] = 0  # q = 0: -dmin * m, exact (17 bits)
    d_sc_q = dequantized(scaled.reshape(data.shape))
    dmin_m = -dequantized(offset.reshape(data.shape))
    return d_sc_q - dmin_m, np.abs(d_sc_q) + np.abs(dmin_m)


def int8_product_bound(magnitude: np.ndarray, xq: np.ndarray, extra_terms: int = 0) -> np.ndarray:
    """The fp32 error of adding the rows' products with xq [n, cols] in any order, the integer
    parts exact: (cols + 4 + extra_terms) unit roundoffs of the sum of the terms' magnitudes
    (a few roundings per block and chunk on top of the sum's)."""
    count = magnitude.shape[1] + 4 + extra_terms
    return count * EPS32 * (np.abs(xq) @ magnitude.T) + 1e-30
