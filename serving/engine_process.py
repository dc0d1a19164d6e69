"""The pipeline in its own process: the event loop parses HTTP, a forked engine process batches and answers.

In the default ``engine: thread`` mode the batcher thread (state read, model, rerank) and the event loop
(HTTP) share one GIL: on a 2-core box the model's Python between torch ops and the HTTP parsing of the
next requests take turns, and every hand-over costs up to the switch interval (docs/SERVING.md measured
~10 ms of that at 1,000 req/s). ``engine: process`` forks the built service after start-up (the model is
already loaded, copy-on-write) into a child with its own interpreter and GIL:

* the HTTP process keeps only the event loop: it validates a request, writes it to the engine over a
  socket pair, and the loop's reader resolves the waiting handler when the batch's answers come back
  (already serialized to JSON by the engine, so the loop only copies bytes out);
* the engine process batches what is waiting in the socket (the same rule as :class:`DynamicBatcher`:
  whatever is queued joins at once, the first request waits at most ``max_wait_s`` for company) and runs
  ``process(batch)`` on its one thread.

The engine's Prometheus series (stages, batch sizes, fallbacks, KV cache) live in its own registry; the
HTTP process asks for them at scrape time and adds them to its own (:func:`serving.metrics.merge_expositions`).
If the engine dies, the waiting requests fail with :class:`EngineUnavailable` (the HTTP layer answers them
with the marked fallback) and a new engine is forked from the HTTP process's copy of the service.
The engine exits when its socket closes, so it never outlives the HTTP process.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from serving.batcher import BatcherClosed, Overloaded, Queued, check_limits, run_process

log = logging.getLogger(__name__)

REQUEST, METRICS = 0, 1  # message kinds, HTTP process -> engine
RESTART_MIN_INTERVAL_S = 1.0  # a crashing engine is re-forked at most this often
HEADER = struct.Struct("!I")  # each message: its length, then the pickle
RECV_BYTES = 1 << 18
WATCHDOG_EVERY_S = 0.5


class FrameReader:
    """Length-prefixed messages out of a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out = []
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            end = HEADER.size + size
            if len(self.buffer) < end:
                break
            out.append(bytes(self.buffer[HEADER.size : end]))
            del self.buffer[:end]
        return out


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a blocking socket; EOFError when the peer closed it."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the HTTP process closed the engine's socket")
        got += n
    return bytes(buf)


class EngineUnavailable(RuntimeError):
    """The engine process died with this request in flight (or is being restarted)."""


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class EngineProcess:
    """Same interface as :class:`serving.batcher.DynamicBatcher` (start, submit, close), in a child process.

    ``process(batch)`` runs in the child and returns one result per entry; ``encode(result)`` turns a result
    into what travels back (``Answer.to_json`` for the service: bytes, so the event loop does not serialize).
    ``render_metrics()`` runs in the child when the HTTP process scrapes; ``after_fork()`` runs in each new
    child first (the service starts its own metric series there, from zero).
    """

    def __init__(
        self,
        process: Callable[[Sequence[Queued[Any]]], Sequence[Any]],
        *,
        max_size: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        encode: Callable[[Any], Any] = lambda result: result,
        render_metrics: Callable[[], bytes] = lambda: b"",
        after_fork: Callable[[], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        hang_timeout_s: float = 10.0,
        name: str = "ugt-engine",
        max_queue: int | None = None,
    ):
        check_limits(max_size, max_wait_s)
        self.max_queue = max_queue  # requests sent and not answered at most; past it submit raises Overloaded
        self.process = process
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.encode = encode
        self.render_metrics = render_metrics
        self.after_fork = after_fork
        self.on_restart = on_restart
        self.hang_timeout_s = hang_timeout_s
        # ident -> when it was sent, for every message the engine has not answered (whether or not its caller
        # still waits): the watchdog's "asked". Oldest first (dict order), cleared with each new engine.
        self._unanswered: dict[int, float] = {}
        self._last_heard = 0.0  # when the engine last wrote anything
        self._watchdog: asyncio.TimerHandle | None = None
        self.name = name
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._sock: socket.socket | None = None
        self._frames = FrameReader()
        self._unsent = bytearray()
        self._child: multiprocessing.process.BaseProcess | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._last_start = float("-inf")
        self.restarts = 0

    # -- HTTP process --------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def start(self) -> None:
        """Fork the engine (call from the event loop, after the service is built)."""
        if self._closed:
            raise BatcherClosed("the engine is closed")
        if self._child is not None and self._child.is_alive():
            return
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        child = multiprocessing.get_context("fork").Process(
            target=self._child_main, args=(theirs, ours), name=self.name, daemon=True
        )
        self._last_start = time.monotonic()
        child.start()
        theirs.close()
        # non-blocking on this side, whatever the loop does with it: the event loop never waits on the engine
        ours.setblocking(False)
        self._sock, self._child = ours, child
        self._frames = FrameReader()
        self._unsent = bytearray()
        self._loop.add_reader(ours.fileno(), self._on_readable)
        self._unanswered.clear()
        self._last_heard = time.monotonic()
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(WATCHDOG_EVERY_S, self._check_hang)
        log.info("engine process %d started", child.pid)

    def health(self) -> dict[str, Any]:
        """The /health check of the engine: up (its socket open and the process alive) and how often restarted."""
        alive = self._sock is not None and self._child is not None and self._child.is_alive()
        state = "up" if alive else "restarting"
        return {"ok": alive, "detail": f"engine process {self.pid} {state}, {self.restarts} restarts"}

    async def submit(self, item: Any, timeout_s: float | None = None) -> Any:
        """The engine's (encoded) result for ``item``; TimeoutError after ``timeout_s``; EngineUnavailable."""
        if self._closed:
            raise BatcherClosed("the engine is closed")
        if self._sock is None:
            raise EngineUnavailable("the engine process is restarting")
        if self.max_queue is not None and len(self._unanswered) >= self.max_queue:
            raise Overloaded()
        return await self._call(REQUEST, item, timeout_s)

    async def metrics(self, timeout_s: float = 2.0) -> bytes:
        """The engine's Prometheus exposition (empty when it does not answer in time)."""
        if self._sock is None:
            return b""
        try:
            return await self._call(METRICS, None, timeout_s)
        except (TimeoutError, EngineUnavailable):
            return b""

    async def _call(self, kind: int, item: Any, timeout_s: float | None) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        ident = next(self._ids)
        self._pending[ident] = future
        timer = loop.call_later(timeout_s, _expire, future) if timeout_s is not None else None
        try:
            self._write(frame((kind, ident, time.perf_counter(), item)))
            self._unanswered[ident] = time.monotonic()
            return await future
        finally:
            self._pending.pop(ident, None)
            if timer is not None:
                timer.cancel()

    def _write(self, data: bytes) -> None:
        """Send now what the socket takes; the rest goes out when it is writable again (never blocks)."""
        sock = self._sock
        if sock is None:
            raise EngineUnavailable("the engine process is restarting")
        if self._unsent:  # keep the order: behind what is already waiting
            self._unsent += data
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise EngineUnavailable(f"engine process not reachable: {exc}") from exc
        if sent < len(data):
            self._unsent += data[sent:]
            assert self._loop is not None
            self._loop.add_writer(sock.fileno(), self._flush)

    def _flush(self) -> None:
        sock = self._sock
        assert sock is not None and self._loop is not None
        try:
            sent = sock.send(self._unsent)
        except BlockingIOError:
            return
        except OSError:
            return  # the reader sees the engine's end close and handles it
        del self._unsent[:sent]
        if not self._unsent:
            self._loop.remove_writer(sock.fileno())

    def _on_readable(self) -> None:
        """On the event loop: every message the engine has written, each a batch of (id, result, error)."""
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                self._engine_died(exc)
                return
            if not data:
                self._engine_died(EOFError("the engine closed its socket"))
                return
            self._last_heard = time.monotonic()  # it answers: not hung
            for message in self._frames.feed(data):
                for ident, result, error in pickle.loads(message):
                    self._unanswered.pop(ident, None)
                    future = self._pending.get(ident)
                    if future is None or future.done():  # timed out already
                        continue
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(result)

    def _check_hang(self) -> None:
        """Every WATCHDOG_EVERY_S: an engine that has written nothing for hang_timeout_s while a message it has
        not answered waited that long is killed (and so restarted); those requests have had their timeout
        fallback long before. An idle engine (everything answered) is never killed, however long it idles."""
        assert self._loop is not None
        if self._closed:
            return
        self._watchdog = self._loop.call_later(WATCHDOG_EVERY_S, self._check_hang)
        if not self._unanswered or self._sock is None or self._child is None:
            return
        oldest = next(iter(self._unanswered.values()))
        silent = time.monotonic() - max(oldest, self._last_heard)
        if silent > self.hang_timeout_s and self._child.is_alive():
            log.error("engine process %d answered nothing for %.1f s while asked (%d messages unanswered): "
                      "killing it (a new one is forked)", self._child.pid, silent, len(self._unanswered))
            self._unanswered.clear()
            self._child.kill()  # its socket closes: _on_readable sees EOF and restarts it

    def _engine_died(self, exc: BaseException) -> None:
        assert self._loop is not None and self._sock is not None
        self._detach()
        if self._closed:
            return
        code = None
        if self._child is not None:
            self._child.join(timeout=1.0)  # reap it and learn why
            if self._child.is_alive():  # its socket closed but it lives on: it is of no use any more
                self._child.kill()
                self._child.join(timeout=1.0)
            code = self._child.exitcode
        log.error("engine process died (exit code %s, %r); %d requests in flight get the fallback",
                  code, exc, len(self._pending))
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(EngineUnavailable(f"engine process died (exit code {code})"))
        self._pending.clear()
        wait = max(0.0, self._last_start + RESTART_MIN_INTERVAL_S - time.monotonic())
        self._loop.call_later(wait, self._restart)

    def _detach(self) -> None:
        """Stop watching and close this side of the engine's socket (and drop what was not sent)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            try:
                self._loop.remove_reader(sock.fileno())
                self._loop.remove_writer(sock.fileno())
            except (ValueError, RuntimeError):  # the loop is closed already
                pass
        sock.close()
        self._unsent.clear()

    def _restart(self) -> None:
        if self._closed or self._sock is not None:
            return
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart()
        self.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine: closing its socket ends it after the batch it is running."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._detach()
        if self._child is not None:
            self._child.join(timeout)
            if self._child.is_alive():
                self._child.terminate()
                self._child.join(timeout)

    # -- engine process --------------------------------------------------------------------------------------
    def _child_main(self, sock: socket.socket, parent_end: socket.socket) -> None:
        parent_end.close()  # so the parent closing its end reads as EOF here
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the HTTP process shuts us down
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not uvicorn's handler, which would only flag its loop
        signal.set_wakeup_fd(-1)
        sock.setblocking(True)
        gc.freeze()  # what was built before the fork stays shared and out of the collector's passes
        if self.after_fork is not None:
            self.after_fork()
        try:
            while True:
                batch, controls = self._collect(sock, self._receive(sock))
                for ident in controls:
                    sock.sendall(frame([(ident, self.render_metrics(), None)]))
                if batch:
                    sock.sendall(self._answers_frame(self._answer(batch)))
        except (EOFError, OSError):
            return
        finally:
            os._exit(0)  # skip the parent's atexit handlers and finalizers, which are not ours to run

    @staticmethod
    def _receive(sock: socket.socket) -> tuple[int, int, float, Any]:
        (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
        return pickle.loads(_recv_exact(sock, size))

    def _collect(self, sock: socket.socket, first: tuple) -> tuple[list[tuple[int, Queued[Any]]], list[int]]:
        """(requests, metrics asks) starting at ``first``: what is queued joins, then wait until first + max_wait."""
        batch: list[tuple[int, Queued[Any]]] = []
        controls: list[int] = []
        message: tuple | None = first
        deadline = first[2] + self.max_wait_s
        while message is not None:
            kind, ident, arrived, item = message
            if kind == METRICS:
                controls.append(ident)
            else:
                batch.append((ident, Queued(item, arrived, None, None)))  # type: ignore[arg-type]
            if len(batch) >= self.max_size:
                break
            remaining = max(deadline - time.perf_counter(), 0.0)
            ready, _, _ = select.select([sock], [], [], remaining)
            message = self._receive(sock) if ready else None
        return batch, controls

    def _answer(self, batch: list[tuple[int, Queued[Any]]]) -> list[tuple[int, Any, BaseException | None]]:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        results, errors = run_process(self.process, [entry for _, entry in batch])
        out: list[tuple[int, Any, BaseException | None]] = []
        for (ident, _), result, error in zip(batch, results, errors, strict=True):
            if error is None:
                try:
                    result = self.encode(result)
                except Exception as exc:  # one answer that cannot be encoded fails alone
                    log.exception("encoding an answer failed")
                    result, error = None, exc
            out.append((ident, result if error is None else None, error))
        return out

    @staticmethod
    def _answers_frame(answers: list[tuple[int, Any, BaseException | None]]) -> bytes:
        """The batch's frame; an answer or error that cannot be pickled travels as a RuntimeError naming it."""
        try:
            return frame(answers)
        except Exception:
            safe = []
            for ident, result, error in answers:
                try:
                    pickle.dumps((result, error))
                    safe.append((ident, result, error))
                except Exception as exc:
                    safe.append((ident, None, RuntimeError(f"answer cannot be sent to the HTTP process: {exc!r}")))
            return frame(safe)
