"""Builds the native module with CMake (FFNSKIP_CUDA=AUTO|ON|OFF selects the CUDA backend;
FFNSKIP_CUBLAS_ROOT points at a cuBLAS outside the CUDA toolkit)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


# Built beside the module by CMake when the CUDA backend is on; loaded from there at run time.
CUDA_LIBRARY = "libffnskip_cuda.so"


class CMakeBuild(build_ext):
    def copy_extensions_to_source(self) -> None:
        """Editable installs copy only the declared module into the source tree: the CUDA
        backend library has to travel with it."""
        super().copy_extensions_to_source()
        for ext in self.extensions:
            package = ext.name.rpartition(".")[0].replace(".", os.sep)
            built = Path(self.build_lib) / package / CUDA_LIBRARY
            if built.is_file():
                source = Path(self.get_finalized_command("build_py").get_package_dir(
                    ext.name.rpartition(".")[0]))
                shutil.copy2(built, source / CUDA_LIBRARY)

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
        # Every target: _core, and libffnskip_cuda.so when the CUDA backend is built; both land
        # in the package directory (CMAKE_LIBRARY_OUTPUT_DIRECTORY), where the loader looks.
        # CMake finds cuBLAS itself, in the nvidia-cublas wheel of the environment being
        # installed into too (see cmake/ffnskip_cuda.cmake).
        subprocess.run(["cmake", "--build", "."], cwd=build_dir, check=True)


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
