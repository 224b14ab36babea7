"""The sealed payload: a JSON config plus named float32 arrays, packed as an .npz without pickles."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

_CONFIG_KEY = "__config__"


def pack(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    if _CONFIG_KEY in arrays:
        raise ValueError(f"array name {_CONFIG_KEY!r} is reserved")
    buf = io.BytesIO()
    encoded = np.frombuffer(json.dumps(config, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buf, **{_CONFIG_KEY: encoded}, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    config = json.loads(arrays.pop(_CONFIG_KEY).tobytes())
    return config, arrays
