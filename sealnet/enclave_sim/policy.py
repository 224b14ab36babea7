"""Access policy of the trusted module: dictionary-attack lockout, revocation, quotas and the audit log.

Like a TPM's dictionary-attack protection, failed license checks are counted in a sliding window, per end
client (the caller, or the client a trusted forwarder such as the runtime names), per license (only for
tokens whose owner signature verified: anybody can write any license id into a forged token) and over all
callers together. The license's signature is checked first: a license the owner signed is refused only for
its own failures (expired, revoked, another model: the license lockout, at OpenSession and on every data
call), never for a client's, so no amount of other clients' bad attempts (from however many addresses, or
one shared address) refuses a valid license. A bad attempt from a client over its threshold, or any bad
attempt while all of them together are over the global one, is refused RESOURCE_EXHAUSTED instead of
PERMISSION_DENIED until the window has passed (and audited once a second rather than once per attempt).
Counters and quota usage persist in a state file, pruned of what has expired and written at most once per
second, so restarting the module does not reset them.
The audit log is hash-chained (each record carries the sha256 of the one before, across rotated files) so a
deleted or edited record is detected by `sealnet audit verify`.
Nothing here ever records a secret: clients are named by peer / certificate / forwarded identity, licenses
by their id, never by the token.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sealnet.errors import FailedPrecondition, SealnetError

SAVE_INTERVAL_S = 1.0  # the state file is rewritten at most this often (and on close)
MAX_TRACKED = 100_000  # lockout keys kept at most; beyond that the longest-quiet ones are forgotten
GENESIS = "0" * 64  # `prev` of the first record of a new audit chain


@dataclass(frozen=True)
class PolicyConfig:
    max_failures: int = 10  # failed OpenSession attempts allowed per client, and per license, in `window_s`
    window_s: float = 60.0
    max_bad_attempts: int = 600  # failed attempts of all callers together in `window_s` (then refused at once)
    quota_items: int = 0  # items per license per `quota_window_s`; 0 = unlimited
    quota_window_s: float = 3600.0


class PolicyRefusal(SealnetError):
    """A request refused by policy; `kind` is 'lockout', 'revoked', 'quota', or 'unavailable' (the policy
    cannot decide, e.g. the revocation list is missing: refused, but not the client's failure). Its status
    follows the kind (STATUS_OF_KIND), so the trusted module answers each kind alike wherever it arises."""

    status = grpc.StatusCode.PERMISSION_DENIED
    STATUS_OF_KIND = {"lockout": grpc.StatusCode.RESOURCE_EXHAUSTED, "quota": grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "revoked": grpc.StatusCode.PERMISSION_DENIED,
                      "unavailable": grpc.StatusCode.FAILED_PRECONDITION}

    def __init__(self, kind: str, message: str, *, status: grpc.StatusCode | None = None):
        super().__init__(message, status=status or self.STATUS_OF_KIND.get(kind, self.status))
        self.kind = kind


class AuditChainError(FailedPrecondition):
    """An audit log whose hash chain is broken: the message names the file and line."""


def record_hash(line: str) -> str:
    """The chain link of one audit record: sha256 of its JSON line (without the newline)."""
    return hashlib.sha256(line.encode()).hexdigest()


def _last_line(path: Path) -> str | None:
    """The last non-empty line of `path`, reading only its tail; None for a missing or empty file."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            block = 4096
            while True:
                start = max(0, size - block)
                f.seek(start)
                lines = f.read(size - start).rstrip(b"\n").split(b"\n")
                if len(lines) > 1 or start == 0:
                    return lines[-1].decode() or None
                block *= 4
    except FileNotFoundError:
        return None


class AuditLog:
    """Append-only JSON lines, one per decision, hash-chained; flushed per line so a crash loses nothing.

    Past `max_bytes` the file is rotated (path -> path.1 -> ... -> path.`keep`, the oldest dropped); `reopen()`
    (SIGHUP) starts a new file at `path` after an external logrotate. Either way the chain continues: the
    first record of a new file links to the last record of the previous one."""

    def __init__(self, path: Path | None, *, max_bytes: int = 64 << 20, keep: int = 10):
        self._lock = threading.Lock()
        self._file = None
        self._path = path
        self._max_bytes, self._keep = max_bytes, keep
        self._prev = GENESIS
        self._size = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            last = _last_line(path) or _last_line(self._rotated(1))
            self._prev = record_hash(last) if last else GENESIS
            self._open()

    def _rotated(self, i: int) -> Path:
        return self._path.with_name(f"{self._path.name}.{i}")

    def _open(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1)
        self._size = os.fstat(fd).st_size

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        with self._lock:
            record = {"time": round(time.time(), 3), "event": event, **fields, "prev": self._prev}
            line = json.dumps(record, sort_keys=True)
            self._file.write(line + "\n")
            self._prev = record_hash(line)
            self._size += len(line) + 1
            if self._max_bytes > 0 and self._size >= self._max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        self._rotated(self._keep).unlink(missing_ok=True)
        for i in range(self._keep - 1, 0, -1):
            if self._rotated(i).exists():
                os.replace(self._rotated(i), self._rotated(i + 1))
        os.replace(self._path, self._rotated(1))
        self._open()

    def reopen(self) -> None:
        """Close and reopen `path` (after an external rotation renamed it); the chain carries on."""
        if self._file is None:
            return
        with self._lock:
            self._file.close()
            self._open()

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()


@dataclass(frozen=True)
class ChainSummary:
    records: int
    head: str  # hash of the last record: record it elsewhere to detect a later rewrite of the whole tail
    from_genesis: bool  # False: the first file continues a chain whose earlier files were not given


def verify_audit_chain(paths: list[Path]) -> ChainSummary:
    """Check the hash chain through `paths` (oldest first, e.g. audit.jsonl.2 audit.jsonl.1 audit.jsonl);
    raise AuditChainError naming the first line whose link does not match the record before it."""
    prev: str | None = None
    first: str | None = None
    count = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\n")
                try:
                    link = json.loads(line)["prev"]
                except (ValueError, KeyError, TypeError):
                    raise AuditChainError(f"{path}:{lineno}: not an audit record (edited or truncated)") from None
                if prev is None:
                    first = link
                elif link != prev:
                    raise AuditChainError(f"{path}:{lineno}: does not link to the record before it: a record was "
                                          "deleted before this line, or the one before it was edited")
                prev = record_hash(line)
                count += 1
    return ChainSummary(count, prev or GENESIS, first in (None, GENESIS))


class Revocations:
    """License ids and serial numbers listed one per line in a text file ('#' starts a comment).

    The file is re-read whenever its modification time changes, so revoking needs no restart.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._mtime: float | None = None
        self._entries: frozenset[str] = frozenset()

    def entries(self) -> frozenset[str]:
        if self.path is None:
            return frozenset()
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            # Fail closed: a configured revocation list that disappeared is an error, not "nothing revoked"; it
            # is the operator's fault, not the client's, so it is no lockout failure.
            raise PolicyRefusal("unavailable", f"revocation list {self.path.name} is missing; refusing sessions "
                                               "until it is restored") from None
        if mtime != self._mtime:
            lines = self.path.read_text().splitlines()
            self._entries = frozenset(line.split("#", 1)[0].strip() for line in lines) - {""}
            self._mtime = mtime
        return self._entries

    def is_revoked(self, license_id: str, serial_number: str) -> bool:
        entries = self.entries()
        return license_id in entries or serial_number in entries


class AccessPolicy:
    """Lockout counters and quota usage, persisted to `state_path` (JSON, 0600) at most once per second."""

    def __init__(self, config: PolicyConfig, state_path: Path | None, *, clock: Callable[[], float] = time.time):
        self.config = config
        self._path = state_path
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}
        self._all_failures: collections.deque[float] = collections.deque(maxlen=max(1, config.max_bad_attempts))
        self._usage: dict[str, list[list[float]]] = {}  # license id -> [[time, items], ...]
        self._dirty = False
        self._last_save = 0.0  # time.monotonic() of the last write
        self._timer: threading.Timer | None = None
        self.saves = 0  # state-file writes so far
        if state_path is not None and state_path.exists():
            state = json.loads(state_path.read_text())
            self._failures = {k: list(v) for k, v in state.get("failures", {}).items()}
            self._usage = {k: [list(e) for e in v] for k, v in state.get("usage", {}).items()}
            self._prune(self._clock())

    # -- lockout -----------------------------------------------------------------------------------------
    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.config.window_s]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def check_not_locked(self, client: str | None, license_id: str | None = None, *,
                         all_clients: bool = False) -> None:
        """Raise PolicyRefusal('lockout') while `client`, the license `license_id` or (`all_clients`) the bad
        attempts of all callers together are over their threshold."""
        now = self._clock()
        keys = ([("client", client)] if client else []) + ([("license", license_id)] if license_id else [])
        with self._lock:
            if all_clients and len(self._all_failures) >= self.config.max_bad_attempts \
                    and now - self._all_failures[0] < self.config.window_s:
                raise PolicyRefusal("lockout", f"more than {self.config.max_bad_attempts} failed license checks "
                                               f"from all clients in {self.config.window_s:.0f} s; retry later")
            for kind, name in keys:
                recent = self._recent(f"{kind}:{name}", now)
                if len(recent) >= self.config.max_failures:
                    wait = self.config.window_s - (now - recent[-self.config.max_failures])
                    raise PolicyRefusal("lockout", f"too many failed license checks from {kind} {name!r}; retry in "
                                                   f"{wait:.0f} s")

    def record_failure(self, client: str, license_id: str | None = None) -> None:
        """Count a failed check against `client` and, for a license whose signature verified, its id."""
        now = self._clock()
        keys = [f"client:{client}"] + ([f"license:{license_id}"] if license_id else [])
        with self._lock:
            self._all_failures.append(now)
            for key in keys:
                times = self._failures.setdefault(key, [])
                times.append(now)
                del times[: -self.config.max_failures]  # only the latest `max_failures` decide
            if len(self._failures) > MAX_TRACKED:
                self._prune(now)
            self._changed()

    # -- quota -------------------------------------------------------------------------------------------
    def charge(self, license_id: str, items: int) -> None:
        """Count `items` against the license's quota, or raise PolicyRefusal('quota') without counting."""
        if self.config.quota_items <= 0:
            return
        now = self._clock()
        with self._lock:
            used = [e for e in self._usage.get(license_id, []) if now - e[0] < self.config.quota_window_s]
            total = sum(int(e[1]) for e in used)
            if total + items > self.config.quota_items:
                self._usage[license_id] = used
                raise PolicyRefusal("quota", f"license quota of {self.config.quota_items} items per "
                                             f"{self.config.quota_window_s:.0f} s reached ({total} used)")
            if used and now - used[-1][0] < 1.0:  # one entry per second at most: bounded per license
                used[-1][1] += items
            else:
                used.append([now, items])
            self._usage[license_id] = used
            self._changed()

    # -- state -------------------------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        """Drop expired failures and usage; past MAX_TRACKED keys, forget the ones quiet the longest."""
        self._failures = {k: kept for k, v in self._failures.items()
                          if (kept := [t for t in v if now - t < self.config.window_s])}
        if len(self._failures) > MAX_TRACKED:
            quiet_first = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in quiet_first[: len(self._failures) - MAX_TRACKED]:
                del self._failures[key]
        self._usage = {k: kept for k, v in self._usage.items()
                       if (kept := [e for e in v if now - e[0] < self.config.quota_window_s])}

    def _changed(self) -> None:
        """Persist now if the last write is a second old, else once that second is over (one timer)."""
        if self._path is None:
            return
        self._dirty = True
        wait = self._last_save + SAVE_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._save()
        elif self._timer is None:
            self._timer = threading.Timer(wait, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def flush(self) -> None:
        """Write pending changes now (the timer, and close())."""
        with self._lock:
            self._timer = None
            if self._dirty:
                self._save()

    def close(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
        self.flush()

    def _save(self) -> None:
        self._prune(self._clock())
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"failures": self._failures, "usage": self._usage}, f)
        os.replace(tmp, self._path)
        self._dirty = False
        self._last_save = time.monotonic()
        self.saves += 1
