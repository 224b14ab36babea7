"""Dynamic batching: concurrent ModelInfer calls merged into one trusted-module call per license and one
ONNX Runtime run, as Triton's dynamic batcher does. Small concurrent requests are where a Python server
spends its time per call; merging them amortises the trusted-module hop and the network launch.

Requests queue on the server's event loop; `workers` loops each take what is queued (up to `max_batch`
items), hand the merged batch to a worker thread (the trusted-module call and ONNX Runtime release the GIL),
and resolve each request's future with its slice of the result.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from runtime.enclave_client import EnclaveError


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 64  # items per merged run
    # How long the first request of a batch may wait for company. 0: take only what is already queued, so a
    # lone request never waits and batches form from the requests that arrive while the workers are busy.
    max_queue_delay_ms: float = 0.0
    workers: int = 2  # merged batches in flight (one in the trusted module while another runs the network)


DEFAULT_BATCHING = BatchingConfig()


@dataclass
class _Pending:
    token: str
    client: str
    batch: np.ndarray
    future: asyncio.Future


Outcome = tuple[np.ndarray | None, EnclaveError | None]


def process_group(preprocess: Callable[[str, str, np.ndarray], np.ndarray], run: Callable[[np.ndarray], np.ndarray],
                  requests: list[tuple[str, str, np.ndarray]]) -> list[Outcome]:
    """Serve (token, client, batch) requests together: one preprocess call per license, one network run.

    Runs in a worker thread. A refused license fails only its own requests.
    """
    outcomes: list[Outcome] = [(None, None)] * len(requests)
    by_license: dict[str, list[int]] = {}
    for i, (token, _, _) in enumerate(requests):
        by_license.setdefault(token, []).append(i)
    served: list[tuple[int, np.ndarray]] = []
    for token, members in by_license.items():
        parts = [requests[i][2] for i in members]
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        try:
            processed = preprocess(token, requests[members[0]][1], raw)
        except EnclaveError as exc:
            for i in members:
                outcomes[i] = (None, exc)
            continue
        offset = 0
        for i, part in zip(members, parts, strict=True):
            served.append((i, processed[offset : offset + len(part)]))
            offset += len(part)
    if not served:
        return outcomes
    try:
        inputs = served[0][1] if len(served) == 1 else np.concatenate([x for _, x in served])
        logits = run(inputs)
    except Exception as exc:  # the network failed: every request of this run gets INTERNAL, nothing else
        error = EnclaveError(grpc.StatusCode.INTERNAL, f"inference failed: {type(exc).__name__}")
        for i, _ in served:
            outcomes[i] = (None, error)
        return outcomes
    offset = 0
    for i, x in served:
        outcomes[i] = (logits[offset : offset + len(x)], None)
        offset += len(x)
    return outcomes


class DynamicBatcher:
    """Create inside the server's event loop; `await submit(...)` from request handlers."""

    def __init__(self, preprocess: Callable[[str, str, np.ndarray], np.ndarray],
                 run: Callable[[np.ndarray], np.ndarray], config: BatchingConfig = DEFAULT_BATCHING):
        self._preprocess = preprocess
        self._run = run
        self.config = config
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="batch")
        self._tasks = [asyncio.get_running_loop().create_task(self._loop()) for _ in range(config.workers)]

    async def submit(self, token: str, client: str, batch: np.ndarray) -> np.ndarray:
        """This request's logits once its merged batch has run; raises the trusted module's EnclaveError."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(token, client, batch, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        items = 0
        while self._queue and (not group or items + len(self._queue[0].batch) <= self.config.max_batch):
            pending = self._queue.popleft()
            group.append(pending)
            items += len(pending.batch)
        return group

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.config.max_queue_delay_ms > 0 and sum(len(p.batch) for p in self._queue) < self.config.max_batch:
                await asyncio.sleep(self.config.max_queue_delay_ms / 1000)
            group = self._take()
            if not group:
                continue
            requests = [(p.token, p.client, p.batch) for p in group]
            outcomes = await loop.run_in_executor(self._executor, process_group, self._preprocess, self._run,
                                                  requests)
            for pending, (result, error) in zip(group, outcomes, strict=True):
                if pending.future.done():  # the caller went away (deadline, cancellation)
                    continue
                if error is not None:
                    pending.future.set_exception(error)
                else:
                    pending.future.set_result(result)
