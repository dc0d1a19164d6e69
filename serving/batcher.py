"""Dynamic batching: concurrent requests share one state read and one generator call.

Request handlers (on the asyncio event loop) ``await batcher.submit(item)``; one worker thread takes the
first waiting item, waits at most ``max_wait_s`` from that item's arrival for up to ``max_size - 1`` more,
then calls ``process(batch)`` once. Under light load a request waits at most ``max_wait_s``; under heavy load
batches fill at once and the wait costs nothing, while the model runs once per batch instead of per request.
The blocking work (Redis, torch) stays off the event loop, which only parses HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class Queued(Generic[T]):
    """One waiting request: the item, when it arrived (perf_counter), and where its answer goes."""

    item: T
    arrived: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class BatcherClosed(RuntimeError):
    """submit() after close()."""


class Overloaded(RuntimeError):
    """The queue in front of the model is full (back-pressure): refused at once, never queued to time out.

    The HTTP layer answers 429 with ``Retry-After`` or the marked fallback (``overload_response``)."""

    def __init__(self, retry_after_s: float = 1.0):
        super().__init__(f"the engine's queue is full; retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


def _resolve(answers: list[tuple[asyncio.Future, object, BaseException | None]]) -> None:
    """On the event loop: hand every answer of a batch to its waiting handler (one loop wake-up per batch)."""
    for future, result, error in answers:
        if future.done():  # the handler gave up (timeout / client gone)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def check_limits(max_size: int, max_wait_s: float) -> None:
    if max_size < 1 or max_wait_s < 0:
        raise ValueError(f"max_size must be >= 1 and max_wait_s >= 0, got {max_size}, {max_wait_s}")


def run_process(
    process: Callable[[Sequence[Queued[T]]], Sequence[R]], batch: list[Queued[T]]
) -> tuple[list[R | None], list[BaseException | None]]:
    """(results, errors), one each per entry: ``process(batch)``, or its exception for every entry of the batch.

    Every waiter must hear back, whatever happened; a ``process`` that returns the wrong number of results
    is an error too.
    """
    try:
        results = list(process(batch))
        if len(results) != len(batch):
            raise RuntimeError(f"process returned {len(results)} results for {len(batch)} requests")
        return list(results), [None] * len(batch)
    except BaseException as exc:
        log.exception("batch of %d failed", len(batch))
        return [None] * len(batch), [exc] * len(batch)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class Deadlines:
    """One event loop's waiting futures in deadline order, and one timer for the earliest still waiting.

    Every request of a service has the same time budget, so deadlines arrive in order: a deque append per request
    replaces a timer per request (uvloop's ``call_later`` is a libuv timer handle, started and then cancelled for
    almost every request). A request whose deadline would come before the last one's gets its own timer.
    """

    __slots__ = ("loop", "waiting", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiting: deque[tuple[float, asyncio.Future]] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, future: asyncio.Future, timeout_s: float) -> asyncio.TimerHandle | None:
        """``future`` gets TimeoutError after ``timeout_s`` unless done before; its own timer when out of order."""
        deadline = self.loop.time() + timeout_s
        waiting = self.waiting
        if waiting and deadline < waiting[-1][0]:
            return self.loop.call_at(deadline, _expire, future)
        while waiting and waiting[0][1].done():  # answered ones leave as they reach the head (not held a budget)
            waiting.popleft()
        waiting.append((deadline, future))
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._sweep)
        return None

    def _sweep(self) -> None:
        """Expire every future past its deadline, drop the answered ones, and wait for the next deadline."""
        self.timer = None
        now = self.loop.time()
        waiting = self.waiting
        while waiting:
            deadline, future = waiting[0]
            if not future.done():
                if deadline > now:
                    self.timer = self.loop.call_at(deadline, self._sweep)
                    return
                future.set_exception(TimeoutError())
            waiting.popleft()


class DynamicBatcher(Generic[T, R]):
    """Groups submitted items into batches of at most ``max_size``, waiting at most ``max_wait_s``.

    ``process(batch)`` gets the queued entries (so it can see each one's queueing time) and returns one
    result per entry, in order; if it raises, every request of that batch gets the exception.
    ``on_batch(size)`` is called once per batch (metrics).
    """

    def __init__(
        self,
        process: Callable[[Sequence[Queued[T]]], Sequence[R]],
        *,
        max_size: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        name: str = "ugt-batcher",
        max_queue: int | None = None,
    ):
        check_limits(max_size, max_wait_s)
        self.max_queue = max_queue  # waiting requests at most; past it submit raises Overloaded
        self.process = process
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[Queued[T] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._closed = False
        self._lock = threading.Lock()
        self._deadlines: Deadlines | None = None  # the submitting loop's (a new loop gets its own)

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the batches already queued."""
        self._closed = True
        if self._started:
            self._queue.put(None)
            self._thread.join(timeout)

    async def submit(self, item: T, timeout_s: float | None = None) -> R:
        """The result of ``process`` for ``item``, computed in some batch; TimeoutError after ``timeout_s``.

        (The loop's :class:`Deadlines`, not asyncio.wait_for: no task and no timer per request. The batch still
        runs the item.)
        """
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        if self.max_queue is not None and self._queue.qsize() >= self.max_queue:
            raise Overloaded()
        if not self._started:
            self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        timer = None
        if timeout_s is not None:
            deadlines = self._deadlines
            if deadlines is None or deadlines.loop is not loop:
                deadlines = self._deadlines = Deadlines(loop)
            timer = deadlines.add(future, timeout_s)
        self._queue.put(Queued(item, time.perf_counter(), future, loop))
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()

    def _collect(self, first: Queued[T]) -> tuple[list[Queued[T]], bool]:
        """The batch that starts with ``first``; True when close() was seen while collecting."""
        batch = [first]
        deadline = first.arrived + self.max_wait_s
        while len(batch) < self.max_size:
            try:  # whatever is already waiting joins without waiting
                nxt = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            results, errors = run_process(self.process, batch)
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for entry, result, error in zip(batch, results, errors, strict=True):
                by_loop.setdefault(entry.loop, []).append((entry.future, result, error))
            for loop, answers in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve, answers)
                except RuntimeError:  # the loop is closed (app shut down)
                    pass
