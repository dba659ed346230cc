"""FiRST routers as a value and their file format (numpy only, no torch).

Router l reads ``m_l``, the mean over the prompt of layer l's own input RMSNorm applied to the
residual stream entering it, and gives ``g_l = sigmoid(w_l . m_l + b_l)``; the layer runs for
the whole sequence (prompt and decode) when ``g_l >= threshold`` and leaves the residual
unchanged otherwise (``docs/methods.md``, FiRST).

The router file is a safetensors file (``weight`` float32 [L, d], ``bias`` float32 [L], with
``format``/``version``/``num_layers``/``hidden_size`` metadata). Training lives in
``ffnskip_ext.training.first``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _core
from ..loaders.safetensors import SafetensorsFile

ROUTER_FORMAT = "ffnskip-first-routers"
ROUTER_VERSION = "1"
ROUTER_FILE = "first-routers.safetensors"  # inside a Hugging Face model directory
ROUTER_SUFFIX = ".first-routers.safetensors"  # replaces ".gguf" of a GGUF file
DEFAULT_THRESHOLD = 0.5
# Routers average their input over at most this many prompt tokens (the engine's constant).
ROUTER_PROMPT_TOKENS: int = _core.ROUTER_PROMPT_TOKENS
# Gates of Routers.constant at 0 and 1: a finite logit whose float32 sigmoid is 1 (or ~1e-13).
_SATURATED_LOGIT = 30.0


@dataclasses.dataclass(eq=False)
class Routers:
    """FiRST routers of a model with ``num_layers`` layers of width ``hidden_size``.

    The arrays are stored as read-only float32 copies; ``metadata`` always holds the format
    entries, ``path`` is the file they were loaded from or last saved to.
    """

    weight: np.ndarray  # float32 [L, d]
    bias: np.ndarray  # float32 [L]
    path: str | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        weight = np.array(self.weight, dtype=np.float32, order="C")
        bias = np.array(self.bias, dtype=np.float32, order="C")
        if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
            raise ValueError(f"routers: weight must have shape [layers, hidden], "
                             f"got {list(weight.shape)}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"routers: bias must have shape [{weight.shape[0]}] (one per "
                             f"layer of weight), got {list(bias.shape)}")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise ValueError("routers: weight or bias contains NaN or infinite values")
        # Read-only: a policy holding these routers must not change under the engine.
        weight.setflags(write=False)
        bias.setflags(write=False)
        self.weight, self.bias = weight, bias
        if self.path is not None:
            self.path = os.fspath(self.path)
        metadata = dict(self.metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("routers: metadata keys and values must be strings")
        required = {"format": ROUTER_FORMAT, "version": ROUTER_VERSION,
                    "num_layers": str(self.num_layers), "hidden_size": str(self.hidden_size)}
        for key, value in required.items():
            if metadata.get(key, value) != value:
                raise ValueError(f"routers: metadata {key}={metadata[key]!r} does not match "
                                 f"the weights ({value!r})")
        self.metadata = {**metadata, **required}

    @property
    def num_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Routers):
            return NotImplemented
        return (np.array_equal(self.weight, other.weight)
                and np.array_equal(self.bias, other.bias) and self.metadata == other.metadata)

    def __hash__(self) -> int:
        # + 0.0 turns -0.0 into 0.0, which compare equal.
        return hash(((self.weight + 0.0).tobytes(), (self.bias + 0.0).tobytes()))

    def gates(self, features: np.ndarray) -> np.ndarray:
        """Gates float32 [L] for router inputs ``features`` [L, d] (the m_l)."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape != self.weight.shape:
            raise ValueError(f"features must have shape {list(self.weight.shape)}, "
                             f"got {list(features.shape)}")
        logits = np.einsum("ld,ld->l", self.weight, features) + self.bias
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    @classmethod
    def constant(cls, num_layers: int, hidden_size: int,
                 gates: float | Sequence[float]) -> Routers:
        """Routers whose gate is a fixed value per layer, whatever the prompt (w = 0,
        b = logit(gate)); gates 0 and 1 give saturated finite logits (+-30)."""
        values = np.broadcast_to(np.asarray(gates, dtype=np.float64), (num_layers,))
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"gates must be in [0, 1], got {values.tolist()}")
        with np.errstate(divide="ignore"):
            logits = np.log(values) - np.log1p(-values)
        logits = np.clip(logits, -_SATURATED_LOGIT, _SATURATED_LOGIT)
        return cls(np.zeros((num_layers, hidden_size), np.float32), logits.astype(np.float32),
                   metadata={"model": "constant"})

    def save(self, path: str | os.PathLike[str]) -> str:
        """Writes the router file (atomically: a temporary file renamed into place) and sets
        ``path``; returns the path."""
        path = os.fspath(path)
        tensors = {"bias": self.bias, "weight": self.weight}
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name, array in tensors.items():
            header[name] = {"dtype": "F32", "shape": list(array.shape),
                            "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(encoded)))
                f.write(encoded)
                for array in tensors.values():
                    f.write(array.astype("<f4").tobytes())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.path = path
        return path


def load_routers(path: str | os.PathLike[str]) -> Routers:
    """Reads a router file written by :meth:`Routers.save` (numpy only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"router file not found: {path}")
    st = SafetensorsFile(path)  # validates the header, offsets and sizes
    metadata = st.metadata
    if not isinstance(metadata, dict) or metadata.get("format") != ROUTER_FORMAT:
        raise ValueError(f"{path}: not a FiRST router file (metadata format is "
                         f"{metadata.get('format') if isinstance(metadata, dict) else None!r}, "
                         f"expected {ROUTER_FORMAT!r})")
    if metadata.get("version") != ROUTER_VERSION:
        raise ValueError(f"{path}: router file version {metadata.get('version')!r} is not "
                         f"supported (expected {ROUTER_VERSION!r})")
    if set(st.entries) != {"weight", "bias"}:
        raise ValueError(f"{path}: expected tensors 'bias' and 'weight', found "
                         f"{sorted(st.entries)}")
    for name in ("weight", "bias"):
        if st.entries[name].get("dtype") != "F32":
            raise ValueError(f"{path}: tensor {name!r} must be F32, got "
                             f"{st.entries[name].get('dtype')!r}")
    try:
        layers, hidden = int(metadata["num_layers"]), int(metadata["hidden_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: metadata needs integer num_layers and hidden_size") from e
    for name, shape in (("weight", (layers, hidden)), ("bias", (layers,))):
        if st.shape(name) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(st.shape(name))}, "
                             f"metadata says {list(shape)}")
    try:
        return Routers(st.read("weight"), st.read("bias"), path=path, metadata=metadata)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def default_router_path(model_path: str | os.PathLike[str]) -> str:
    """Where routers of a model live: ``dir/first-routers.safetensors`` for a Hugging Face
    directory, ``/dir/X.first-routers.safetensors`` for ``/dir/X.gguf``."""
    model_path = os.fspath(model_path)
    if os.path.isdir(model_path):
        return os.path.join(model_path, ROUTER_FILE)
    return os.path.splitext(model_path)[0] + ROUTER_SUFFIX


# Routers shipped with the package, by the file name of the model they were trained for
# (the bundled default model; docs/results/smollm2-135m-first/README.md says how).
_PACKAGED_DIR = os.path.join(os.path.dirname(__file__), "data")


def model_routers(model_path: str | os.PathLike[str]) -> str | None:
    """The FiRST routers of a model: the file next to it (``default_router_path``), else the
    ones the package ships for the bundled model; None when there are none."""
    beside = default_router_path(model_path)
    if os.path.isfile(beside):
        return beside
    packaged = os.path.join(_PACKAGED_DIR, os.path.basename(beside))
    return packaged if os.path.isfile(packaged) else None


def threshold_logit(threshold: float) -> float:
    """log(t / (1 - t)) in float32 as the engine computes it: a layer is kept when its router
    logit is >= this (the same as g >= t, without sigmoid rounding near the threshold)."""
    if threshold <= 0:
        return -math.inf
    if threshold >= 1:
        return math.inf
    t = np.float32(threshold)
    return float(np.log(t / (np.float32(1) - t)))
