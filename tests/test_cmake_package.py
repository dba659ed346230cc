"""The C++ library installs with its headers and CMake package, and another project links it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_find_package_and_link(tmp_path: Path) -> None:
    prefix, build, consumer = tmp_path / "prefix", tmp_path / "build", tmp_path / "consumer"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []

    def run(*cmd: str | Path) -> str:
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    run("cmake", "-S", ROOT, "-B", build, *generator, "-DFFNSKIP_BUILD_PYTHON=OFF",
        "-DFFNSKIP_BUILD_BENCHMARKS=OFF", "-DFFNSKIP_CUDA=OFF", f"-DCMAKE_INSTALL_PREFIX={prefix}")
    run("cmake", "--build", build)
    run("cmake", "--install", build)
    assert (prefix / "include" / "ffnskip" / "decoder.h").is_file()
    run("cmake", "-S", ROOT / "tests" / "cmake_consumer", "-B", consumer, *generator,
        f"-DCMAKE_PREFIX_PATH={prefix}")
    run("cmake", "--build", consumer)
    assert "position=4" in run(consumer / "consumer")
