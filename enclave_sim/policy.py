"""Access policy of the trusted module: dictionary-attack lockout, revocation, quotas and the audit log.

Like a TPM's dictionary-attack protection, failed license checks are counted per client identity in a
sliding window; past the threshold the client is refused (RESOURCE_EXHAUSTED) until the window has passed.
Counters and quota usage persist in a state file so that restarting the module does not reset them.
Nothing here ever records a secret: clients are named by peer / certificate / forwarded identity, licenses
by their id, never by the token.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PolicyConfig:
    max_failures: int = 10  # failed OpenSession attempts allowed per client in `window_s`
    window_s: float = 60.0
    per_caller_factor: int = 10  # a direct caller (e.g. the runtime) may fail this many times more in total
    quota_items: int = 0  # items per license per `quota_window_s`; 0 = unlimited
    quota_window_s: float = 3600.0


class PolicyRefusal(Exception):
    """A request refused by policy; `kind` is 'lockout', 'revoked' or 'quota'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class AuditLog:
    """Append-only JSON lines, one per decision; flushed per line so a crash loses nothing."""

    def __init__(self, path: Path | None):
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with self._lock:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


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
            # Fail closed: a configured revocation list that disappeared is an error, not "nothing revoked".
            raise PolicyRefusal("revoked", f"revocation list {self.path} is missing; refusing new sessions") from None
        if mtime != self._mtime:
            lines = self.path.read_text().splitlines()
            self._entries = frozenset(line.split("#", 1)[0].strip() for line in lines) - {""}
            self._mtime = mtime
        return self._entries

    def is_revoked(self, license_id: str, serial_number: str) -> bool:
        entries = self.entries()
        return license_id in entries or serial_number in entries


class AccessPolicy:
    """Lockout counters and quota usage, persisted to `state_path` (JSON, 0600) after every change."""

    def __init__(self, config: PolicyConfig, state_path: Path | None, *, clock: Callable[[], float] = time.time):
        self.config = config
        self._path = state_path
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}
        self._usage: dict[str, list[list[float]]] = {}  # license id -> [[time, items], ...]
        if state_path is not None and state_path.exists():
            state = json.loads(state_path.read_text())
            self._failures = {k: list(v) for k, v in state.get("failures", {}).items()}
            self._usage = {k: [list(e) for e in v] for k, v in state.get("usage", {}).items()}

    # -- lockout -----------------------------------------------------------------------------------------
    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.config.window_s]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def check_not_locked(self, client: str, caller: str) -> None:
        """Raise PolicyRefusal('lockout') while `client` (or its direct `caller`) is over the threshold."""
        now = self._clock()
        with self._lock:
            for key, limit in ((f"client:{client}", self.config.max_failures),
                               (f"caller:{caller}", self.config.max_failures * self.config.per_caller_factor)):
                recent = self._recent(key, now)
                if len(recent) >= limit:
                    wait = self.config.window_s - (now - recent[0])
                    raise PolicyRefusal("lockout", f"too many failed license checks from {key.split(':', 1)[0]} "
                                                   f"{key.split(':', 1)[1]!r}; retry in {wait:.0f} s")

    def record_failure(self, client: str, caller: str) -> None:
        now = self._clock()
        with self._lock:
            for key in (f"client:{client}", f"caller:{caller}"):
                self._failures.setdefault(key, []).append(now)
            self._save()

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
            used.append([now, items])
            self._usage[license_id] = used
            self._save()

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"failures": self._failures, "usage": self._usage}, f)
        os.replace(tmp, self._path)
