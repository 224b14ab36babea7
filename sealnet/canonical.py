"""The one JSON encoding of everything that gets signed or hashed (licenses, manifests, serial records and
claims, the CA registry's entries): sorted keys, no whitespace, ASCII."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """The bytes that get signed: sorted keys, no whitespace, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
