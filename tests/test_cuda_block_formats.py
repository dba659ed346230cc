"""The CUDA kernels' decoding of GGUF blocks, without a GPU: block_formats.cuh compiled for the
host (tests/cuda_host/decode_blocks.cu, with nvcc) decodes every chunk of every block as the
GEMV and the dequantisation kernels do, and must give gguf-py's weights bit for bit, with the
chunks' runs covering each element once. Its products are exact in fp32, so fused
multiply-adds on the device cannot change them; what this cannot see is the device's loads and
the kernels around the decoding (tests/test_cuda_kernels.py, on a GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf_files import Q, quantize, random_blocks  # noqa: E402  (needs gguf)

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def decode_blocks(tmp_path_factory) -> Path:
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    program = tmp_path_factory.mktemp("cuda_host") / "decode_blocks"
    subprocess.run(
        [NVCC, "-std=c++17", "-Xcompiler", "-Wall,-Wextra", f"-I{ROOT / 'csrc/cuda'}",
         f"-I{ROOT / 'csrc/include'}", str(ROOT / "tests/cuda_host/decode_blocks.cu"),
         str(ROOT / "csrc/core/tensor_types.cpp"), "-o", str(program)],
        check=True)
    return program


@pytest.mark.parametrize("blocks", ["random_bytes", "quantized_gaussian"])
@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_block_decoding_equals_gguf(decode_blocks, tmp_path, type_name, blocks) -> None:
    rng = np.random.default_rng(7)
    rows, cols = 9, 1024
    if blocks == "random_bytes":  # every bit pattern of the quants (K-quant scales too)
        data = random_blocks(type_name, rows, cols, rng)
    else:
        data = quantize(rng.standard_normal((rows, cols)), type_name)
    (tmp_path / "in.bin").write_bytes(np.ascontiguousarray(data).tobytes())
    subprocess.run([str(decode_blocks), type_name, str(tmp_path / "in.bin"),
                    str(tmp_path / "out.bin")], check=True)
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(rows, cols)
    want = gguf.quants.dequantize(data, Q[type_name]).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
