"""A safetensors file: the header validated, tensor data memory-mapped (numpy only)."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np

# Little-endian on disk; bf16 is read as raw uint16 and widened by hand (numpy has no bf16).
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class SafetensorsFile:
    """Header-validated view of one safetensors file; tensor data is memory-mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{path}: too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ValueError(
                    f"{path}: header length {header_len} exceeds the file size {size}"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: malformed safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: malformed safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None)
        self.metadata: dict[str, Any] = metadata if isinstance(metadata, dict) else {}
        self.entries: dict[str, Any] = header
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self.entries.get(name)
        if entry is None:
            raise ValueError(f"{self.path}: missing tensor {name!r}")
        try:
            return tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: tensor {name!r} has a malformed shape entry") from e

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array (never a view into the mapped file)."""
        shape = self.shape(name)
        entry = self.entries[name]
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(
                f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r} "
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
        expected_bytes = math.prod(shape) * dtype.itemsize
        if end - begin != expected_bytes:
            raise ValueError(
                f"{self.path}: tensor {name!r} holds {end - begin} bytes, but shape "
                f"{list(shape)} of {entry['dtype']} needs {expected_bytes}"
            )
        raw = self._map[self.data_start + begin : self.data_start + end].view(dtype)
        if entry["dtype"] == "BF16":
            # bf16 is the high half of an fp32: widen and shift into place.
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32).reshape(shape)
