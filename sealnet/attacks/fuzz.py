"""Request fuzzing for both services: mutated valid messages, random structured messages, random bytes.

Each generated request knows whether an OK answer would be legitimate (a well-formed request with a valid
license or session, or a public call such as Health); an OK anywhere else is an unprotected answer. Seeded, so
a finding can be replayed with the same --seed.
"""

from __future__ import annotations

import string
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError, Message

from sealnet.attacks.base import progress
from sealnet.attacks.wire import Reply, Wire, classify, reply_of

WINDOW = 8  # requests in flight at once
MAX_STRUCTURED_BYTES = 4 << 20
_ODD_DIMS = (-(2**63), -1, 0, 1, 2, 3, 7, 8, 28, 64, 1024, 1025, 2**31, 2**62, 2**63 - 1)
_ODD_FLOATS = np.array([np.nan, np.inf, -np.inf, 1e38, -1e38, -1.0, 0.0, 1.0], dtype=np.float32)
_CHARS = string.printable + "éß\u4e2d\u0000\U0001f600"


@dataclass
class Seed:
    """A valid request for one method, and when an OK answer to (a mutation of) it would be legitimate."""

    path: str
    message: Message
    metadata: list[tuple[str, str]] | None = field(default=None, repr=False)
    ok_allowed: Callable[[Message], bool] = lambda _: True
    structured: Callable[[np.random.Generator], Message] | None = None


def random_text(rng: np.random.Generator, max_len: int = 40) -> str:
    return "".join(rng.choice(list(_CHARS), size=int(rng.integers(0, max_len + 1))))


def random_shape(rng: np.random.Generator, item_shape: tuple[int, ...], max_batch: int) -> list[int]:
    """Mostly plausible shapes (the right item shape, a batch near the limits), sometimes anything."""
    if rng.random() < 0.6:
        batch = int(rng.choice([0, 1, 2, 5, max_batch, max_batch + 1, -1]))
        return [batch, *item_shape]
    return [int(rng.choice(_ODD_DIMS)) for _ in range(int(rng.integers(0, 7)))]


def random_floats(rng: np.random.Generator, shape: list[int]) -> bytes:
    """Exactly the byte count `shape` needs (when small enough) or a random length; sometimes NaN / inf."""
    count = int(np.prod(shape)) if shape and all(0 < d < 1 << 31 for d in shape) else -1
    if not 0 <= count * 4 <= MAX_STRUCTURED_BYTES or rng.random() < 0.2:
        return rng.bytes(int(rng.integers(0, 4096)))
    values = rng.random(count, dtype=np.float32)
    if rng.random() < 0.3:
        values[rng.integers(0, count, size=max(1, count // 50))] = rng.choice(_ODD_FLOATS)
    return values.astype("<f4").tobytes()


def mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One of: flip bits, overwrite bytes, truncate, insert, duplicate a slice, or splice with itself."""
    buf = bytearray(data)
    kind = int(rng.integers(0, 6))
    if kind == 0 and buf:
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 9))):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1 and buf:
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 9))):
            buf[pos] = int(rng.integers(0, 256))
    elif kind == 2:
        del buf[int(rng.integers(0, len(buf) + 1)):]
    elif kind == 3:
        pos = int(rng.integers(0, len(buf) + 1))
        buf[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == 4 and buf:
        start = int(rng.integers(0, len(buf)))
        buf += buf[start : start + int(rng.integers(1, 256))]
    else:
        buf += data  # protobuf merges a repeated message: repeated fields double, scalars are overwritten
    return bytes(buf)


def generate(rng: np.random.Generator, seed: Seed) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return rng.bytes(int(rng.integers(0, 1024)))
    if roll < 0.6 and seed.structured is not None:
        return seed.structured(rng).SerializeToString()
    return mutate(rng, seed.message.SerializeToString())


def ok_allowed(seed: Seed, body: bytes) -> bool:
    """Parse the bytes as the server will; an OK to a request it cannot parse is never legitimate."""
    try:
        parsed = type(seed.message).FromString(body)
    except (DecodeError, ValueError, RuntimeError):
        return False
    return seed.ok_allowed(parsed)


@dataclass
class FuzzStats:
    sent: int = 0
    seconds: float = 0.0
    kinds: Counter = field(default_factory=Counter)  # ok / refused / parser / unprotected / hang / crash / unhandled
    codes: Counter = field(default_factory=Counter)
    parser_codes: Counter = field(default_factory=Counter)  # the statuses gRPC refused unparseable bytes with
    findings: list[dict[str, Any]] = field(default_factory=list)
    aborted: str = ""

    def record(self, path: str, reply: Reply, allowed: bool) -> str:
        kind = classify(reply, allowed)
        self.sent += 1
        self.kinds[kind] += 1
        self.codes[reply.code.name] += 1
        if kind == "parser":
            self.parser_codes[reply.code.name] += 1
        if kind not in ("ok", "refused", "parser") and len(self.findings) < 10:
            self.findings.append({"method": path, "kind": kind, "status": reply.code.name,
                                  "details": reply.details[:200]})
        return kind


def fuzz(wire: Wire, seeds: list[Seed], *, count: int, seconds: float, seed: int, desc: str) -> FuzzStats:
    """Send `count` generated requests (at most `seconds`), `WINDOW` in flight; stop early if the server is gone."""
    rng = np.random.default_rng(seed)
    stats = FuzzStats()
    pending: deque = deque()
    down_streak = 0
    start = time.monotonic()

    def settle() -> None:
        nonlocal down_streak
        path, allowed, fut = pending.popleft()
        kind = stats.record(path, reply_of(fut), allowed)
        down_streak = down_streak + 1 if kind in ("crash", "hang") else 0

    with progress(total=count, desc=desc, unit="req") as bar:
        for _ in range(count):
            if time.monotonic() - start > seconds:
                stats.aborted = f"time limit of {seconds:.0f} s reached"
                break
            if down_streak >= 25:
                stats.aborted = "25 consecutive crashes / hangs: the server is down"
                break
            chosen = seeds[int(rng.integers(0, len(seeds)))]
            body = generate(rng, chosen)
            pending.append((chosen.path, ok_allowed(chosen, body), wire.future(chosen.path, body, chosen.metadata)))
            if len(pending) >= WINDOW:
                settle()
                bar.update(1)
        while pending:
            settle()
            bar.update(1)
    stats.seconds = time.monotonic() - start
    return stats
