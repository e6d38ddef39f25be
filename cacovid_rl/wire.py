"""msgpack encoding with numpy arrays as ext types: the only format that crosses processes or disks.

Nothing here unpickles: a malicious or corrupt file can at worst fail to decode. Arrays are stored
as (dtype string, shape, raw bytes); decoding returns a read-only view over the message buffer
(zero-copy), so callers that need to write must copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np

_NDARRAY = 1
_ALLOWED_KINDS = set("biuf")  # bool, int, uint, float: no object arrays


class WireError(ValueError):
    """A message or file could not be decoded; names what was being read."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot encode numpy array of dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj)
        header = msgpack.packb([arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(_NDARRAY, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot encode object of type {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _NDARRAY:
        return msgpack.ExtType(code, data)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype_str, shape = next(unpacker)
    offset = unpacker.tell()
    dtype = np.dtype(dtype_str)
    if dtype.kind not in _ALLOWED_KINDS:
        raise WireError(f"refusing numpy dtype {dtype_str}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def packb(obj: Any) -> bytes:
    """Encode dicts/lists/scalars/strings/numpy arrays to msgpack bytes."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpackb(data: bytes | memoryview, what: str = "message") -> Any:
    """Decode msgpack bytes produced by :func:`packb`; errors name ``what``."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise WireError(f"could not decode {what}: {exc}") from exc


def write_file(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as msgpack atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(packb(obj))
    tmp.replace(path)


def read_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise WireError(f"file '{path}' does not exist")
    return unpackb(path.read_bytes(), what=f"file '{path}'")
