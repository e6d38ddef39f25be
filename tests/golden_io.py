"""Loader for the official CaCoVID golden data (outputs of the official code) copied under ``tests/golden/``.

Array blobs are ``{"dtype", "shape", "b64"}`` dicts: little-endian, row-major raw bytes in base64. ``float16`` values
are upcast to float32 (the official code ran in float32 on the upcast values); ``q16`` is int16 times ``scale``
(exact in float32).
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

_RAW_DTYPES = {
    "float32": "<f4",
    "float64": "<f8",
    "int8": "<i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "<u1",
    "bool": "|b1",
}


@cache
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_golden(name: str) -> dict[str, Any]:
    """The parsed golden file ``tests/golden/<name>`` (``.json`` optional), cached; do not mutate the result."""
    path = GOLDEN_DIR / (name if name.endswith(".json") else f"{name}.json")
    return _load(path)


def is_blob(d: object) -> bool:
    """True when ``d`` is an encoded array blob."""
    return isinstance(d, dict) and {"dtype", "shape", "b64"} <= d.keys()


def blob(d: dict[str, Any]) -> np.ndarray:
    """Decode one array blob to a numpy array (float16 and q16 come back as float32)."""
    raw = base64.b64decode(d["b64"])
    shape = tuple(d["shape"])
    dtype = d["dtype"]
    if dtype == "float16":
        return np.frombuffer(raw, "<f2").reshape(shape).astype(np.float32)
    if dtype == "q16":
        return np.frombuffer(raw, "<i2").reshape(shape).astype(np.float32) * np.float32(d["scale"])
    if dtype not in _RAW_DTYPES:
        raise ValueError(f"unknown golden blob dtype {dtype!r}")
    return np.frombuffer(raw, _RAW_DTYPES[dtype]).reshape(shape).copy()
