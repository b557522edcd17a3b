"""Minimal safetensors reader/writer on numpy memmaps (bfloat16 via ml_dtypes).

Reading maps the file and returns per-tensor views, so a checkpoint is consumed one tensor at
a time without loading whole files. Writing streams tensors into a file whose header is
computed from shapes up front. Format: u64 little-endian header length, JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from clawjax.model.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """(tensor entries by name, byte offset where data starts) of one .safetensors file."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if entry.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}; "
                                  f"supported: {sorted(_DTYPES)}")
    return header, 8 + n


def read_tensor(path: str | os.PathLike, entry: dict, data_start: int) -> np.ndarray:
    """Read-only memmap view of one tensor (no copy until it is transformed)."""
    dtype = _DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor byte range {begin}..{end} does not match shape {shape} {entry['dtype']}")
    if count == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def write_file(path: str | os.PathLike, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write tensors `specs` (name, shape, dtype) fetching each array by name only when its
    bytes are written; at most one tensor is held at a time. Writes `path` atomically
    (temp file + rename). Returns the number of data bytes."""
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(fetch(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name}: fetched {arr.shape} {arr.dtype}, declared {tuple(shape)} {dtype}")
            f.write(arr.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
    return offset
