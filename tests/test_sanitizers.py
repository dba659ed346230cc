"""The C++ core under AddressSanitizer and UndefinedBehaviorSanitizer: a sanitized build of
the module runs the tests that exercise the core; any report fails the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The tests that drive the engine on small models (the SmolLM2 and fuzz tests are left out:
# the first take minutes under ASan, the second caps address space, which ASan cannot run in).
CORE_TESTS = ["tests/test_parity.py", "tests/test_bad_input.py", "tests/test_skip_rule.py",
              "tests/test_policies.py", "tests/test_reliability.py", "tests/test_generate.py"]
DESELECT = "not smollm2 and not fuzzed and not cli and not leaks"


def runtime(name: str) -> str:
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else ""


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                    reason="needs cmake and g++")
def test_core_tests_pass_under_asan_and_ubsan(tmp_path: Path) -> None:
    libasan = runtime("libasan.so")
    if not libasan:
        pytest.skip("libasan not available")
    package = tmp_path / "site" / "ffnskip_ext"
    shutil.copytree(ROOT / "python" / "ffnskip_ext", package,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DFFNSKIP_SANITIZE=ON",
         "-DFFNSKIP_CUDA=OFF", "-DFFNSKIP_BUILD_BENCHMARKS=OFF",
         "-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-DPython_EXECUTABLE={sys.executable}",
         f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={package}"],
        capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(["cmake", "--build", str(build), "--target", "_core"],
                              capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]

    logs = tmp_path / "reports"
    logs.mkdir()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(package.parent),
        # libstdc++ too: ASan intercepts __cxa_throw only if it is loaded when ASan starts.
        LD_PRELOAD=f"{libasan} {runtime('libstdc++.so')}",
        # Python itself keeps memory until exit: leak reports would be about the interpreter.
        # Reports go to files: pytest's output capture would swallow them.
        ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={logs}/asan",
        UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={logs}/ubsan",
    )
    where = "import ffnskip_ext; print(ffnskip_ext._core.__file__)"
    check = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True,
                           env=env)
    assert str(package) in check.stdout, check.stdout + check.stderr
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", DESELECT,
         *CORE_TESTS],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800,
    )
    reports = "".join(p.read_text(errors="replace") for p in sorted(logs.iterdir()))
    assert not reports, reports[:8000]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert " passed" in done.stdout
