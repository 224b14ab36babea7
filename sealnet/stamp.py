"""Stamping inputs with a DSN serial number: what the trusted module runs for a DSN bundle (torch-free, like
everything the module imports). Deriving the pattern from the owner's signature, claims and trigger files are
the owner's side, in sealnet/serial.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sealnet.errors import InvalidArgument

REFERENCE_SIZE = 28  # the stamp is 1 pixel per bit at 28x28 (the DSN paper's MNIST) and scales up from there


class SerialError(InvalidArgument, ValueError):
    """A serial record, claim, pattern or trigger file is malformed or does not verify; the message says which."""


def stamp_scale(input_shape: tuple[int, ...]) -> int:
    """Pixels per pattern bit: 1 up to 55x55 inputs, then proportional (224x224 -> 8), as the DSN paper scales."""
    return max(1, min(int(input_shape[-2]), int(input_shape[-1])) // REFERENCE_SIZE)


def as_pattern(pattern: Any) -> np.ndarray:
    p = np.asarray(pattern)
    if p.ndim != 2 or p.size == 0 or not np.isin(p, (0, 1)).all():
        raise SerialError(f"pattern must be a non-empty 2-D array of 0/1 values (got shape {p.shape})")
    return p.astype(np.uint8)


def _region(shape: tuple[int, ...], pattern: np.ndarray, position: tuple[int, int], scale: int
            ) -> tuple[slice, slice]:
    r, c = int(position[0]), int(position[1])
    if scale < 1:
        raise SerialError(f"stamp scale must be >= 1 (got {scale})")
    bh, bw = pattern.shape[0] * scale, pattern.shape[1] * scale
    if r < 0 or c < 0 or r + bh > shape[-2] or c + bw > shape[-1]:
        raise SerialError(f"stamp of {bh}x{bw} pixels at position ({r}, {c}) does not fit a "
                          f"{shape[-2]}x{shape[-1]} input")
    return slice(r, r + bh), slice(c, c + bw)


def stamp_block(pattern: np.ndarray, scale: int) -> np.ndarray:
    """The pattern as pixels: each bit becomes a scale x scale block of 0.0 or 1.0 (float32)."""
    return np.kron(as_pattern(pattern), np.ones((scale, scale), np.uint8)).astype(np.float32)


def stamp(x: np.ndarray, pattern: Any, position: tuple[int, int] = (0, 0), scale: int = 1) -> np.ndarray:
    """x* = x stamped with the serial number (DSN Eq. 7): pixels under the pattern become its bit (0.0 or 1.0),
    in every channel; all other pixels are unchanged. x is NCHW; returns a new float32 array."""
    p = as_pattern(pattern)
    x = np.asarray(x)
    if x.ndim != 4:
        raise SerialError(f"stamp expects NCHW inputs (got shape {x.shape})")
    rows, cols = _region(x.shape, p, position, scale)
    out = np.array(x, dtype=np.float32, copy=True)
    out[:, :, rows, cols] = stamp_block(p, scale)
    return out


@dataclass(frozen=True, eq=False)
class StampSpec:
    """Everything the trusted module needs to stamp inputs: the pattern, where, and how large."""

    pattern: np.ndarray
    position: tuple[int, int]
    scale: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        return stamp(x, self.pattern, self.position, self.scale)

    def to_secret(self) -> dict[str, Any]:
        return {"pattern": self.pattern.astype(int).tolist(), "position": [int(v) for v in self.position],
                "scale": int(self.scale)}

    @classmethod
    def from_secret(cls, secret: dict[str, Any]) -> StampSpec:
        """From a dsn checkpoint's secret (or anything with pattern / position / scale)."""
        try:
            pattern, position, scale = secret["pattern"], secret["position"], secret["scale"]
        except KeyError as exc:
            raise SerialError(f"stamp parameters: missing {exc.args[0]!r}") from None
        pattern = as_pattern(np.asarray(pattern))  # a list, an array or a CPU tensor
        if len(position) != 2:
            raise SerialError(f"stamp position must be [row, col] (got {list(position)})")
        return cls(pattern, (int(position[0]), int(position[1])), int(scale))
