"""A bounded queue that gathers concurrent requests into batches for one model.

Requests wait in a queue of at most ``max_queue`` (a full queue is refused at once: the client
hears "busy" instead of waiting behind a backlog it cannot see). One worker takes the oldest
request and, for up to ``max_wait`` seconds, the next ones with the same batching key, up to
``max_batch``, and runs them in one call on its own thread, so the event loop keeps accepting
connections while the model works and the model never runs two calls at once. A request that
waited longer than ``timeout`` is given up (its client hears "timeout"); if it has not reached the
model yet it is skipped there. A call that fails fails its own requests only.

The key is the image size: a batch pads its images to a common size, which would change a
request's detections with the sizes of the requests it happened to arrive with, so only images of
one size are batched together. (What remains is float rounding: a convolution over a batch may sum
in another order than over one image, ~1e-6 of a pixel; ``max_batch=1`` gives one image at a time.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class _Job:
    item: Any
    key: Hashable
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """``await batcher.submit(item, key)`` -> ``run([items])[i]`` for that item.

    ``run`` takes a list of items (all with one key) and returns one result per item; it runs on
    a single worker thread.
    """

    def __init__(self, run: Callable[[list], list], max_batch: int = 4, max_wait: float = 0.005,
                 max_queue: int = 64, timeout: float = 30.0) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0 or timeout <= 0:
            raise ValueError(f"max_batch and max_queue must be >= 1, max_wait >= 0 and timeout > 0, got "
                             f"{max_batch}, {max_queue}, {max_wait}, {timeout}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.max_queue, self.timeout = max_queue, timeout
        self._waiting: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batches = 0  # statistics for /model and the load test
        self.items = 0

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for job in self._waiting:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._thread.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def submit(self, item: Any, key: Hashable = None) -> Any:
        """The result for ``item``; :class:`QueueFull` at once when the queue is full,
        :class:`TimeoutError` after ``timeout`` seconds, or the exception ``run`` raised."""
        if self._worker is None or self._arrived is None:
            raise RuntimeError("Batcher.start() was not awaited")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} images are waiting for the model (the queue holds {self.max_queue})")
        job = _Job(item, key, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except asyncio.TimeoutError:
            job.future.cancel()  # skipped by the worker if still waiting
            raise TimeoutError(f"no result within {self.timeout:g} s") from None

    def _take(self, key: Hashable, batch: list[_Job]) -> None:
        """Move waiting jobs with ``key`` into ``batch`` (up to ``max_batch``), in arrival order."""
        for job in list(self._waiting):
            if len(batch) >= self.max_batch:
                return
            if job.key == key:
                self._waiting.remove(job)
                if not job.future.done():
                    batch.append(job)

    async def _loop(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._waiting.popleft()
            if first.future.done():  # given up by its client while waiting
                continue
            batch = [first]
            deadline = loop.time() + self.max_wait
            self._take(first.key, batch)
            while len(batch) < self.max_batch and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                self._take(first.key, batch)
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._thread, self.run, [job.item for job in batch])
            except Exception as e:  # the call's requests fail; the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            if len(results) != len(batch):
                error = RuntimeError(f"the model returned {len(results)} results for {len(batch)} images")
                for job in batch:
                    job.future.set_exception(error)
                continue
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
