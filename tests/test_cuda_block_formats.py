"""The CUDA kernels' arithmetic on GGUF blocks, without a GPU, block_formats.cuh compiled for the
host with nvcc. tests/cuda_host/decode_blocks.cu decodes every chunk of every block as the
dequantisation kernels and the embedding lookup do, and must give gguf-py's weights bit for
bit, with the chunks' runs covering each element once (its products are exact in fp32, so fused
multiply-adds on the device cannot change them). tests/cuda_host/quant_dot.cu quantises
activations with the decode GEMV's helpers, which must give the CPU backend's int8 values and
scales bit for bit, and takes every chunk's integer dot product (dot(), dp4a emulated), whose
row sums must be the exact products within fp32 rounding, as the CPU backend's quantised
linear's are. What this cannot see is the device's loads, shuffles and the kernels around the
arithmetic (tests/test_cuda_kernels.py, on a GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ffnskip_ext import _core

gguf = pytest.importorskip("gguf")
from gguf_files import Q, quantize, random_blocks  # noqa: E402  (needs gguf)
from int8_reference import (  # noqa: E402
    ACTIVATION_BLOCK,
    exact_weights,
    int8_product_bound,
    quantize_activations,
)

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")
NATIVE = ["Q8_0", "Q5_0", "Q4_K", "Q6_K"]


def host_program(name: str, folder: Path) -> Path:
    """tests/cuda_host/NAME.cu built for the host."""
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    program = folder / name
    subprocess.run(
        [NVCC, "-std=c++17", "-Xcompiler", "-Wall,-Wextra", f"-I{ROOT / 'csrc/cuda'}",
         f"-I{ROOT / 'csrc/include'}", str(ROOT / f"tests/cuda_host/{name}.cu"),
         str(ROOT / "csrc/core/tensor_types.cpp"), "-o", str(program)],
        check=True)
    return program


@pytest.fixture(scope="module")
def decode_blocks(tmp_path_factory) -> Path:
    return host_program("decode_blocks", tmp_path_factory.mktemp("cuda_host"))


@pytest.fixture(scope="module")
def quant_dot(tmp_path_factory) -> Path:
    return host_program("quant_dot", tmp_path_factory.mktemp("cuda_host"))


def blocks_of(kind: str, type_name: str, rows: int, cols: int,
              rng: np.random.Generator) -> np.ndarray:
    if kind == "random_bytes":  # every bit pattern of the quants (K-quant scales too)
        return random_blocks(type_name, rows, cols, rng)
    return quantize(rng.standard_normal((rows, cols)), type_name)


@pytest.mark.parametrize("blocks", ["random_bytes", "quantized_gaussian"])
@pytest.mark.parametrize("type_name", NATIVE)
def test_block_decoding_equals_gguf(decode_blocks, tmp_path, type_name, blocks) -> None:
    rng = np.random.default_rng(7)
    rows, cols = 9, 1024
    data = blocks_of(blocks, type_name, rows, cols, rng)
    (tmp_path / "in.bin").write_bytes(np.ascontiguousarray(data).tobytes())
    subprocess.run([str(decode_blocks), type_name, str(tmp_path / "in.bin"),
                    str(tmp_path / "out.bin")], check=True)
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(rows, cols)
    want = gguf.quants.dequantize(data, Q[type_name]).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("blocks", ["random_bytes", "quantized_gaussian"])
@pytest.mark.parametrize("type_name", NATIVE)
def test_int8_dot_products_are_the_cpu_backends(quant_dot, tmp_path, type_name, blocks) -> None:
    rng = np.random.default_rng(11)
    rows, cols = 9, 1024
    block = ACTIVATION_BLOCK[type_name]
    data = blocks_of(blocks, type_name, rows, cols, rng)
    x = (rng.standard_normal(cols) * np.exp(rng.standard_normal(cols))).astype(np.float32)
    x[:block] = 0.0  # a block of zeros: scale 0
    x[block + 3] = np.float32(-1e4)  # a block whose maximum is negative
    (tmp_path / "in.bin").write_bytes(np.ascontiguousarray(data).tobytes())
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    subprocess.run([str(quant_dot), type_name, str(tmp_path / "in.bin"), str(tmp_path / "x.bin"),
                    str(tmp_path / "out.bin")], check=True)
    out = np.fromfile(tmp_path / "out.bin", np.float32)
    sizes = [cols, cols // block, cols // 16, rows]
    q, scale, sums16, y = np.split(out, np.cumsum(sizes)[:-1])
    want_q, want_scale, want_sums16 = quantize_activations(x, block)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(scale.view(np.uint32), want_scale.view(np.uint32))
    np.testing.assert_array_equal(sums16, want_sums16)

    w, magnitude = exact_weights(data, type_name)
    xq = (want_q.astype(np.float64) * np.repeat(want_scale.astype(np.float64), block))[None]
    exact = (xq @ w.T)[0]
    bound = int8_product_bound(magnitude, xq)[0]
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / bound)
    pool = _core.kernels.ThreadPool(1)
    for isa in _core.kernels.isas():
        cpu = _core.kernels.linear(pool, data, type_name, None, x[None], None, isa)[0]
        assert np.all(np.abs(cpu - exact) <= bound), (isa, np.max(np.abs(cpu - exact) / bound))
