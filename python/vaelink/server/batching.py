"""Dynamic batching: requests with the same key (model, operation, shape) that arrive within a few
milliseconds of each other - or while the engine is busy - run as one engine call.

The engine runs in a worker thread, never on the event loop. Waiting requests are bounded: past
`max_queue`, `submit` raises `QueueFullError` at once (the app answers 503 with Retry-After).

A request whose waiting is cancelled (its client went away, its deadline passed) is dropped: before
its batch runs, or - when every request of a running batch is gone - by the batch's cancel event,
which the engine checks between tiles and batch slices."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from ..errors import QueueFullError, ShuttingDownError

__all__ = ["Batcher", "Batching", "Job"]


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: up to `max_batch` images per engine call, a group waiting at most
    `max_wait_ms` for company; at most `max_queue` requests waiting, beyond that 503."""

    enabled: bool = True
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64


@dataclass
class Job:
    array: np.ndarray
    """The request's input, batch dimension first."""
    extra: Any
    future: asyncio.Future[Any]

    @property
    def size(self) -> int:
        return len(self.array)


K = TypeVar("K", bound=Hashable)
"""What requests must share to run in one batch."""


@dataclass
class _Group(Generic[K]):
    key: K
    created: float
    jobs: list[Job] = field(default_factory=list)
    size: int = 0


RunBatch = Callable[[K, list[Job], threading.Event], list[Any]]
"""Runs one batch in the worker thread: a result per job, in order (an exception instance fails
its job alone). The event is set when every job of the batch has been abandoned."""
BatchHook = Callable[[K, int, int, float], None]
"""Called after each batch with (key, images, requests, seconds)."""


class Batcher(Generic[K]):
    """Collects jobs into groups by key. A group runs when it holds `max_batch` images, or when its
    first job has waited `max_wait` seconds and a worker is free; until then later jobs join it, so
    under load batches fill up by themselves. `max_batch=1` turns batching off."""

    def __init__(
        self,
        run: RunBatch[K],
        *,
        max_batch: int = 8,
        max_wait: float = 0.005,
        max_queue: int = 64,
        on_batch: BatchHook[K] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be positive, max_wait >= 0")
        self._run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._open: dict[K, _Group[K]] = {}
        self._full: deque[_Group[K]] = deque()
        self._waiting = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the engine (not counting those it is running)."""
        return self._waiting

    async def start(self) -> None:
        # One engine thread: ONNX Runtime parallelises each call itself.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vaelink-engine")
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker())]

    async def stop(self) -> None:
        """Stops the workers (after the server has drained its requests) and fails what is left."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for group in [*self._full, *self._open.values()]:
            self._fail(group.jobs, ShuttingDownError("server shutting down"))
        self._full.clear()
        self._open.clear()
        self._set_waiting(0)
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def submit(self, key: K, array: np.ndarray, extra: Any = None) -> Any:
        """Queues one request and waits for its result."""
        if self._wake is None:
            raise ShuttingDownError("batcher not started")
        if self._waiting >= self.max_queue:
            raise QueueFullError(self._waiting)
        loop = asyncio.get_running_loop()
        job = Job(array, extra, loop.create_future())
        group = self._open.get(key)
        if group is not None and group.size + job.size > self.max_batch:
            self._seal(group)
            group = None
        if group is None:
            group = self._open[key] = _Group(key, loop.time())
        group.jobs.append(job)
        group.size += job.size
        if group.size >= self.max_batch:
            self._seal(group)
        self._set_waiting(self._waiting + 1)
        self._wake.set()
        return await job.future

    # -- internals ------------------------------------------------------------------------------

    def _set_waiting(self, n: int) -> None:
        self._waiting = n
        if self._on_depth is not None:
            self._on_depth(n)

    def _seal(self, group: _Group[K]) -> None:
        """A full group: it takes no more jobs and runs as soon as a worker is free."""
        if self._open.get(group.key) is group:
            del self._open[group.key]
        self._full.append(group)

    def _take(self, now: float) -> _Group[K] | None:
        """The oldest group that may run now: a full one, or an open one past its wait."""
        ready = [g for g in self._open.values() if now - g.created >= self.max_wait]
        if self._full:
            ready.append(self._full[0])
        if not ready:
            return None
        group = min(ready, key=lambda g: g.created)
        if self._full and group is self._full[0]:
            self._full.popleft()
        else:
            del self._open[group.key]
        return group

    async def _next_group(self) -> _Group[K]:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = loop.time()
            group = self._take(now)
            if group is not None:
                return group
            deadlines = [g.created + self.max_wait for g in self._open.values()]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = await self._next_group()
            self._set_waiting(self._waiting - len(group.jobs))
            jobs = [job for job in group.jobs if not job.future.done()]  # drop cancelled ones
            if not jobs:
                continue
            start = time.perf_counter()
            cancel = _cancel_when_abandoned(jobs)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run, group.key, jobs, cancel
                )
                if len(results) != len(jobs):
                    raise RuntimeError(f"batch of {len(jobs)} gave {len(results)} results")
            except asyncio.CancelledError:
                self._fail(jobs, ShuttingDownError("server shutting down"))
                raise
            except Exception as e:  # the engine's error belongs to every request of the batch
                self._fail(jobs, e)
            else:
                for job, result in zip(jobs, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
            if self._on_batch is not None:
                images = sum(job.size for job in jobs)
                self._on_batch(group.key, images, len(jobs), time.perf_counter() - start)
            assert self._wake is not None
            self._wake.set()  # groups may have become ready while this one ran

    @staticmethod
    def _fail(jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)


def _cancel_when_abandoned(jobs: list[Job]) -> threading.Event:
    """An event set once every job's future is cancelled: a batch shared by several requests runs
    on while any of them still waits."""
    cancel = threading.Event()

    def abandoned(_: asyncio.Future[Any]) -> None:
        if all(job.future.cancelled() for job in jobs):
            cancel.set()

    for job in jobs:
        job.future.add_done_callback(abandoned)
    return cancel
