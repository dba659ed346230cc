"""The build survives re-installs, as a user runs them: ``pip install .`` twice in one checkout
(each in pip's own fresh build environment), then an editable install, a change to the C++
sources and the editable install again. Runs in a copy of the checkout and a new virtual
environment, with the CUDA backend off (its compilation would only make this slower)."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Loads the installed extension on its own (the new environment has no numpy for the package)
# and prints its dtype names.
CHECK = """
import glob, importlib.util, sys
found = glob.glob(sys.argv[1] + "/ffnskip_ext/_core*.so")
spec = importlib.util.spec_from_file_location("_core", found[0])
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)
print(",".join(core.DTYPES))
"""


def checkout_copy(target: Path) -> None:
    """The files of the checkout (tracked, and new ones git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in listed.splitlines():
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (
        f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs the git checkout")
def test_install_twice_then_editable_after_a_change(tmp_path) -> None:
    source = tmp_path / "checkout"
    checkout_copy(source)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               source, dict(os.environ)).strip()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FFNSKIP_CUDA"] = "OFF"
    install = [python, "-m", "pip", "install", "--no-deps", "-q"]

    for _ in range(2):  # the second one finds the first one's build directory
        run([*install, "."], source, env)
        assert run([python, "-c", CHECK, site], source, env).strip() == (
            "auto,float32,float16,bfloat16")

    run([*install, "-e", "."], source, env)
    decoder_cpp = source / "csrc" / "core" / "decoder.cpp"
    text = decoder_cpp.read_text()
    changed = text.replace('{"auto", "float32", "float16", "bfloat16"}',
                           '{"auto", "float32", "float16", "bfloat16", "changed"}')
    assert changed != text
    decoder_cpp.write_text(changed)
    run([*install, "-e", "."], source, env)
    package = str(source / "python")
    assert run([python, "-c", CHECK, package], source, env).strip() == (
        "auto,float32,float16,bfloat16,changed")

