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
        cmake = shutil.which("cmake") or "cmake"
        ninja = shutil.which("ninja")
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FFNSKIP_BUILD_TYPE', 'Release')}",
            f"-DFFNSKIP_CUDA={os.environ.get('FFNSKIP_CUDA', 'AUTO')}",
            "-DFFNSKIP_BUILD_BENCHMARKS=OFF",
        ]
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _forget_other_toolchains(build_dir, [cmake, ninja or "make", sys.executable])
        subprocess.run(configure, cwd=build_dir, check=True)
        # Every target: _core, and libffnskip_cuda.so when the CUDA backend is built; both land
        # in the package directory (CMAKE_LIBRARY_OUTPUT_DIRECTORY), where the loader looks.
        # A CUDA library left there by an earlier build is removed first: the build makes it
        # again when the backend is on, and it must not ship when the backend is off.
        # CMake finds cuBLAS itself, in the nvidia-cublas wheel of the environment being
        # installed into too (see cmake/ffnskip_cuda.cmake).
        (out_dir / CUDA_LIBRARY).unlink(missing_ok=True)
        subprocess.run([cmake, "--build", "."], cwd=build_dir, check=True)


# Records the tools a build directory was configured with.
TOOLCHAIN_STAMP = "ffnskip-toolchain.txt"


def _forget_other_toolchains(build_dir: Path, tools: list[str]) -> None:
    """A build directory configured by other tools loses its CMake cache, so that CMake
    configures afresh; the object files stay, and ninja reruns only the commands that changed.

    pip builds in a fresh isolated environment each time, so cmake, ninja and the Python of the
    previous build may no longer exist; the cache would still name them
    ("'/tmp/pip-build-env-XXXX/overlay/bin/ninja' '--version' failed").
    """
    stamp = build_dir / TOOLCHAIN_STAMP
    wanted = "\n".join(tools) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    stamp.write_text(wanted)


setup(
    ext_modules=[CMakeExtension("ffnskip_ext._core")],
    cmdclass={"build_ext": CMakeBuild},
)
