"""Builds the native module with CMake (FFNSKIP_CUDA=AUTO|ON|OFF selects the CUDA backend)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FFNSKIP_BUILD_TYPE', 'Release')}",
            f"-DFFNSKIP_CUDA={os.environ.get('FFNSKIP_CUDA', 'AUTO')}",
            "-DFFNSKIP_BUILD_BENCHMARKS=OFF",
        ]
        if _has_ninja():
            configure += ["-G", "Ninja"]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--target", "_core"], cwd=build_dir, check=True)


def _has_ninja() -> bool:
    try:
        subprocess.run(["ninja", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


setup(
    ext_modules=[CMakeExtension("ffnskip_ext._core")],
    cmdclass={"build_ext": CMakeBuild},
)
