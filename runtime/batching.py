"""Dynamic batching: concurrent ModelInfer calls merged into one trusted-module call per license and one
ONNX Runtime run, as Triton's dynamic batcher does. Small concurrent requests are where a Python server
spends its time per call; merging them amortises the trusted-module hop and the network launch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime.enclave_client import EnclaveError


@dataclass
class _Pending:
    token: str
    client: str
    batch: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: EnclaveError | None = None


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 64  # items per merged run
    # How long the first request of a batch may wait for company. 0: take only what is already queued, so a
    # lone request never waits and batches form from the requests that arrive while the workers are busy.
    max_queue_delay_ms: float = 0.0
    workers: int = 2  # batches in flight at once (one in the trusted module while another runs the network)


DEFAULT_BATCHING = BatchingConfig()


class DynamicBatcher:
    """Queue requests; worker threads drain them into merged batches.

    `preprocess(token, client, raw) -> processed` (the trusted module) is called once per license in a merged
    batch; `run(processed) -> logits` (ONNX Runtime) once for the whole merged batch.
    """

    def __init__(self, preprocess: Callable[[str, str, np.ndarray], np.ndarray],
                 run: Callable[[np.ndarray], np.ndarray], config: BatchingConfig = DEFAULT_BATCHING):
        self._preprocess = preprocess
        self._run = run
        self.config = config
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{i}", daemon=True)
                         for i in range(config.workers)]
        for t in self._threads:
            t.start()

    def submit(self, token: str, client: str, batch: np.ndarray) -> np.ndarray:
        """Block until this request's logits are ready; raises the trusted module's EnclaveError if refused."""
        if self._stopped:
            raise RuntimeError("batcher stopped")
        pending = _Pending(token, client, batch)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def stop(self) -> None:
        self._stopped = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def _gather(self, first: _Pending) -> list[_Pending]:
        group, items = [first], len(first.batch)
        deadline = time.monotonic() + self.config.max_queue_delay_ms / 1000
        while items < self.config.max_batch:
            try:
                wait = deadline - time.monotonic()
                nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # stop signal: put it back for this worker's next turn
                self._queue.put(None)
                break
            if items + len(nxt.batch) > self.config.max_batch:
                self._process([nxt])  # too big to merge with this group: serve it on its own
                continue
            group.append(nxt)
            items += len(nxt.batch)
        return group

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            self._process(self._gather(first))

    def _process(self, group: list[_Pending]) -> None:
        by_license: dict[str, list[_Pending]] = {}
        for p in group:
            by_license.setdefault(p.token, []).append(p)
        served: list[tuple[_Pending, np.ndarray]] = []
        for token, members in by_license.items():
            raw = members[0].batch if len(members) == 1 else np.concatenate([m.batch for m in members])
            try:
                processed = self._preprocess(token, members[0].client, raw)
            except EnclaveError as exc:
                for m in members:
                    m.error = exc
                    m.done.set()
                continue
            offset = 0
            for m in members:
                served.append((m, processed[offset : offset + len(m.batch)]))
                offset += len(m.batch)
        if not served:
            return
        try:
            inputs = served[0][1] if len(served) == 1 else np.concatenate([x for _, x in served])
            logits = self._run(inputs)
        except Exception as exc:  # the network failed: every request of this run gets an INTERNAL error
            import grpc

            for m, _ in served:
                m.error = EnclaveError(grpc.StatusCode.INTERNAL, f"inference failed: {type(exc).__name__}")
                m.done.set()
            return
        offset = 0
        for m, x in served:
            m.result = logits[offset : offset + len(x)]
            offset += len(x)
            m.done.set()
