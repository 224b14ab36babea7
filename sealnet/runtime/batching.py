"""Dynamic batching: concurrent ModelInfer calls merged into one trusted-module call per license and client
and one ONNX Runtime run, as Triton's dynamic batcher does. Small concurrent requests are where a Python server
spends its time per call; merging them amortises the trusted-module hop and the network launch.

Requests queue on the server's event loop; `workers` loops each take what is queued (up to `max_batch`
items), hand the merged batch to the pipeline in a worker thread (the trusted-module call and ONNX Runtime
release the GIL), and resolve each request's future with its own outputs or error.
Backpressure: the queue holds at most `max_queued_items`; past that a request is refused at once
(RESOURCE_EXHAUSTED) instead of waiting behind work it cannot catch up with. A request whose caller went away
(cancelled, or past its deadline) is dropped before it reaches the trusted module.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from sealnet.runtime.errors import InternalError, RequestError
from sealnet.runtime.pipeline import Outcome, Outputs, Request


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 64  # items per merged run
    # How long the first request of a batch may wait for company. 0: take only what is already queued, so a
    # lone request never waits and batches form from the requests that arrive while the workers are busy.
    max_queue_delay_ms: float = 0.0
    workers: int = 2  # merged batches in flight (one in the trusted module while another runs the network)
    max_queued_items: int = 8192  # items waiting at most; more is refused with RESOURCE_EXHAUSTED


DEFAULT_BATCHING = BatchingConfig()


@dataclass
class _Pending:
    request: Request
    future: asyncio.Future
    deadline: float | None  # loop.time() after which the caller no longer waits


class DynamicBatcher:
    """Create inside the server's event loop; `await submit(...)` from request handlers."""

    def __init__(self, serve: Callable[[list[Request]], list[Outcome]], config: BatchingConfig = DEFAULT_BATCHING):
        self._serve = serve
        self.config = config
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="batch")
        self._tasks = [asyncio.get_running_loop().create_task(self._loop()) for _ in range(config.workers)]

    async def submit(self, token: str, client: str, batch: np.ndarray, timeout: float | None = None) -> Outputs:
        """This request's output tensors once its merged batch has run; raises its ServingError. `timeout`: the
        seconds the caller still waits (its gRPC deadline); once past, the request is dropped unserved."""
        if self._queue and self._queued_items + len(batch) > self.config.max_queued_items:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: the request queue is full "
                               f"({self._queued_items} items waiting, at most {self.config.max_queued_items}); "
                               "retry later")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = None if timeout is None else loop.time() + timeout
        self._queue.append(_Pending(Request(token, client, batch), future, deadline))
        self._queued_items += len(batch)
        self._wake.set()
        return await future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _take(self) -> list[_Pending]:
        """The next merged batch, skipping requests whose caller went away (they never reach the module)."""
        group: list[_Pending] = []
        items = 0
        now = asyncio.get_running_loop().time()
        while self._queue and (not group or items + len(self._queue[0].request.batch) <= self.config.max_batch):
            pending = self._queue.popleft()
            self._queued_items -= len(pending.request.batch)
            if pending.future.done():  # cancelled: the client hung up or the handler was cancelled
                continue
            if pending.deadline is not None and now >= pending.deadline:
                pending.future.set_exception(RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline: passed "
                                                          "while the request was queued; not served"))
                continue
            group.append(pending)
            items += len(pending.request.batch)
        return group

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            queued = sum(len(p.request.batch) for p in self._queue)
            if self.config.max_queue_delay_ms > 0 and queued < self.config.max_batch:
                await asyncio.sleep(self.config.max_queue_delay_ms / 1000)
            group = self._take()
            if not group:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._serve, [p.request for p in group])
            except Exception as exc:  # the pipeline returns its errors; this is a last resort that keeps the loop
                outcomes = [(None, InternalError(f"inference failed: {type(exc).__name__}"))] * len(group)
            for pending, (result, error) in zip(group, outcomes, strict=True):
                if pending.future.done():  # the caller went away (deadline, cancellation)
                    continue
                if error is not None:
                    pending.future.set_exception(error)
                else:
                    pending.future.set_result(result)
