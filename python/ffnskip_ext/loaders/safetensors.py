"""A safetensors file: the header validated, the tensors read in place from a memory-mapped
file (``_core.Tensor``) or copied to float32 arrays."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from .. import _core

# The element types the engine reads (safetensors names are the engine's).
DTYPES = ("F32", "F16", "BF16")
# As the format's own reader: a larger header is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 << 20


class SafetensorsFile:
    """Header-validated view of one safetensors file; tensor data stays mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = _core.MappedFile(path)  # ValueError for a FIFO, a device, no access
        data = memoryview(self.file)
        size = len(data)
        if size < 8:
            raise ValueError(f"{path}: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: header length {header_len} exceeds the file size {size} "
                             f"or the limit of {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(bytes(data[8:8 + header_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: malformed safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None)
        self.metadata: dict[str, Any] = metadata if isinstance(metadata, dict) else {}
        self.entries: dict[str, Any] = header
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self.entries.get(name)
        if entry is None:
            raise ValueError(f"{self.path}: missing tensor {name!r}")
        try:
            return tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: tensor {name!r} has a malformed shape entry") from e

    def tensor(self, name: str) -> Any:
        """The tensor as stored, mapped in place (``_core.Tensor``)."""
        shape = self.shape(name)
        entry = self.entries[name]
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise ValueError(
                f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r} "
                f"(supported: {', '.join(DTYPES)})"
            )
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{self.path}: tensor {name!r} has malformed data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            raise ValueError(
                f"{self.path}: tensor {name!r} data_offsets [{begin}, {end}] lie outside "
                f"the data section ({self.data_size} bytes)"
            )
        expected_bytes = math.prod(shape) * _core.TENSOR_TYPES[dtype][1]
        if end - begin != expected_bytes or min(shape, default=1) < 1:
            raise ValueError(
                f"{self.path}: tensor {name!r} holds {end - begin} bytes, but shape "
                f"{list(shape)} of {dtype} needs {expected_bytes}"
            )
        return _core.Tensor(self.file, self.data_start + begin, dtype, list(shape))

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array (never a view into the mapped file)."""
        return self.tensor(name).to_float()
