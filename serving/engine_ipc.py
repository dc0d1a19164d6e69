"""The wire between the HTTP processes and the engine process (serving/engine_core.py), and the HTTP side's end.

One engine design, two shapes: ``engine: process`` is one HTTP process that forks its engine over a socket pair
(serving/engine_process.py); ``ugt serve --workers N`` is N HTTP workers that connect to the supervisor's one
engine over its Unix socket (serving/supervisor.py). Either way a stream socket carries length-prefixed binary
frames: a fixed header (payload length, kind, request id, one float) and a payload of bytes. Requests travel as
orjson of the validated request's fields (about 100 bytes); answers come back as the JSON body the engine already
serialized, which the HTTP process sends to the client as is. Nothing is pickled: a frame is the same bytes
whichever process or Python build reads it.

:class:`EngineConnection` is the HTTP process's end (frames, calls in flight, the non-blocking socket on the event
loop), with the same ``start / submit / close`` shape as :class:`serving.batcher.DynamicBatcher`, so the routes
treat every engine alike. When the engine dies, the requests in flight fail with :class:`EngineUnavailable` (the
HTTP layer answers them with the marked fallback) and the connection is got back: :class:`EngineClient` reconnects
to the engine the supervisor starts again, :class:`serving.engine_process.EngineProcess` forks a new one.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from serving.batcher import BatcherClosed, Deadlines, Overloaded

log = logging.getLogger(__name__)

# header: payload length, kind, request id, a float (a request's arrival time, a refusal's retry-after, a pid)
HEADER = struct.Struct("!IBQd")
MAX_PAYLOAD = 64 * 1024 * 1024  # a frame announcing more is a broken peer, not a message
RECV_BYTES = 1 << 18
TICK_S = 0.2  # how often a lost connection is got back (and a hang watchdog looks)
PUSH_METRICS_EVERY_S = 1.0

# worker -> engine
REQUEST = 1  # payload: orjson {"request": fields, "key": rate-limit key or null}; number: arrival (perf_counter)
METRICS = 2  # payload: the worker's exposition; number: its pid. Answered with METRICS_REPLY (every process added up)
METRICS_PUSH = 3  # payload: the worker's exposition; number: its pid. Kept by the engine, not answered
MODEL = 4  # engine_scope: model: payload a batch of packed rows (serving/model_wire.py); answered with MODEL_ANSWER
ADMIT = 5  # engine_scope: model: payload a rate-limit key; answered with ADMITTED or RATE_LIMITED
# engine -> worker
ANSWER = 10  # payload: the answer's JSON body
NO_POPULARITY = 11  # payload: the message (the worker answers 503)
UNKNOWN_DOMAIN = 12  # payload: the message (422)
FAILED = 13  # payload: the message (the batch itself failed: a 500 with a body)
BUSY = 14  # the engine's queue is full (back-pressure); number: seconds to wait before retrying
RATE_LIMITED = 15  # the key is over its rate limit, counted in the engine for every worker; number: seconds to wait
METRICS_REPLY = 16  # payload: every process's exposition added up
MODEL_ANSWER = 17  # payload: the rows' top-k (serving/model_wire.py)
ADMITTED = 18  # the key is within its rate limit


class FrameError(ValueError):
    """Bytes that are not a frame of this protocol (the peer is broken: the connection is dropped)."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    ident: int
    number: float
    payload: bytes


def encode(kind: int, ident: int, number: float = 0.0, payload: bytes = b"") -> bytes:
    """One frame's bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(len(payload), kind, ident, number) + payload


class FrameDecoder:
    """Frames out of a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        out: list[Frame] = []
        start = 0
        while len(self.buffer) - start >= HEADER.size:
            size, kind, ident, number = HEADER.unpack_from(self.buffer, start)
            if size > MAX_PAYLOAD:
                raise FrameError(f"frame announces {size} bytes, over the {MAX_PAYLOAD}-byte limit")
            end = start + HEADER.size + size
            if len(self.buffer) < end:
                break
            out.append(Frame(kind, ident, number, bytes(self.buffer[start + HEADER.size : end])))
            start = end
        del self.buffer[:start]
        return out


def request_payload(fields: dict[str, Any], limit_key: str | None) -> bytes:
    return orjson.dumps({"request": fields, "key": limit_key})


class RateLimited(RuntimeError):
    """Over the key's rate limit, which the engine keeps for every worker at once."""

    def __init__(self, wait_s: float):
        super().__init__(f"rate limited; retry in {wait_s:g} s")
        self.wait_s = wait_s


class EngineRefused(RuntimeError):
    """The engine answered with an error of this kind (NO_POPULARITY, UNKNOWN_DOMAIN, FAILED) and message."""

    def __init__(self, kind: int, message: str):
        super().__init__(message)
        self.kind = kind


class EngineUnavailable(RuntimeError):
    """The engine died with this request in flight, or is being restarted (the HTTP layer answers the marked
    fallback, ``engine_unavailable``)."""


class EngineConnection(abc.ABC):
    """The HTTP process's end of its connection to an engine in another process, on the event loop (never blocks it).

    Same ``start / submit / close`` shape as :class:`serving.batcher.DynamicBatcher`. Every TICK_S it gets a
    connection back when it has none (:meth:`_reconnect`: :class:`EngineClient` connects to the shared engine's
    Unix socket, :class:`serving.engine_process.EngineProcess` forks its own engine) and, with ``push_metrics``,
    pushes ``exposition()`` (this process's own Prometheus text) every PUSH_METRICS_EVERY_S. A scrape sends it too,
    so /metrics answers every process's series added up by the engine.
    """

    push_metrics = True

    def __init__(self, exposition: Callable[[], bytes] = lambda: b""):
        self.exposition = exposition
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._deadlines: Deadlines | None = None  # the calling loop's (a new loop gets its own)
        # ident -> when it was sent, for every call the engine has not answered (whether or not its caller still
        # waits). Oldest first (dict order); with _last_heard, what a hang watchdog needs.
        self._unanswered: dict[int, float] = {}
        self._last_heard = 0.0
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._unsent = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_push = float("-inf")
        self._closed = False

    @abc.abstractmethod
    def _reconnect(self) -> None:
        """Get a connection to an engine (then :meth:`attach` it), or leave it for the next tick."""

    @abc.abstractmethod
    def health(self) -> dict[str, Any]:
        """The /health check of the engine: ``{"ok": ..., "detail": ...}``."""

    def start(self) -> None:
        """Connect now if an engine is there, else keep trying in the background (call on the event loop)."""
        if self._closed:
            raise BatcherClosed("the engine connection is closed")
        if self._timer is not None:
            return  # started already
        self._loop = asyncio.get_running_loop()
        self._tick()

    def _tick(self) -> None:
        assert self._loop is not None
        if self._closed:
            return
        if self._sock is None:
            self._reconnect()
        if self._sock is not None:
            self._connected_tick()
        self._timer = self._loop.call_later(TICK_S, self._tick)

    def _connected_tick(self) -> None:
        if self.push_metrics and time.monotonic() - self._last_push >= PUSH_METRICS_EVERY_S:
            self._last_push = time.monotonic()
            self._send_quietly(encode(METRICS_PUSH, 0, float(os.getpid()), self.exposition()))

    def attach(self, sock: socket.socket) -> None:
        """Talk to the engine over ``sock`` from now on (non-blocking, read on the event loop)."""
        assert self._loop is not None
        sock.setblocking(False)
        self._sock, self._decoder, self._unsent = sock, FrameDecoder(), bytearray()
        self._unanswered.clear()
        self._last_heard = time.monotonic()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    async def submit(self, fields: dict[str, Any], timeout_s: float | None = None,
                     limit_key: str | None = None) -> bytes:
        """The engine's answer body for the request ``fields``; TimeoutError, EngineUnavailable, Overloaded,
        RateLimited or EngineRefused otherwise."""
        if self._closed:
            raise BatcherClosed("the engine connection is closed")
        return await self._call(REQUEST, time.perf_counter(), request_payload(fields, limit_key), timeout_s)

    async def admit(self, key: str, timeout_s: float | None = None) -> None:
        """Pass the engine's rate limit of ``key`` (engine_scope: model), or raise RateLimited / EngineUnavailable."""
        await self._call(ADMIT, 0.0, key.encode(), timeout_s)

    async def metrics(self, timeout_s: float = 2.0) -> bytes | None:
        """Every process's exposition added up by the engine; None when it does not answer in time."""
        if self._sock is None:
            return None
        try:
            return await self._call(METRICS, float(os.getpid()), self.exposition(), timeout_s)
        except (TimeoutError, EngineUnavailable):
            return None

    async def _call(self, kind: int, number: float, payload: bytes, timeout_s: float | None) -> Any:
        if self._sock is None:
            raise EngineUnavailable("not connected to the engine (it is restarting)")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        ident = next(self._ids)
        frame = encode(kind, ident, number, payload)
        self._pending[ident] = future
        timer = None
        if timeout_s is not None:  # one timer per loop for the calls' deadlines (serving/batcher.py, Deadlines)
            deadlines = self._deadlines
            if deadlines is None or deadlines.loop is not loop:
                deadlines = self._deadlines = Deadlines(loop)
            timer = deadlines.add(future, timeout_s)
        try:
            self._write(frame)
            self._unanswered[ident] = time.monotonic()
            return await future
        finally:
            self._pending.pop(ident, None)
            if timer is not None:
                timer.cancel()

    def _send_quietly(self, data: bytes) -> None:
        try:
            self._write(data)
        except EngineUnavailable:
            pass

    def _write(self, data: bytes) -> None:
        """Send what the socket takes now; the rest when it is writable again (never blocks the loop)."""
        sock = self._sock
        if sock is None:
            raise EngineUnavailable("not connected to the engine (it is restarting)")
        if self._unsent:  # keep the order: behind what is already waiting
            self._unsent += data
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            raise EngineUnavailable(f"engine not reachable: {exc}") from exc
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
        except OSError as exc:
            self._lost(exc)
            return
        del self._unsent[:sent]
        if not self._unsent:
            self._loop.remove_writer(sock.fileno())

    def _on_readable(self) -> None:
        """On the event loop: every frame the engine has written (a batch's answers come in one write)."""
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(exc)
                return
            if not data:
                self._lost(EOFError("the engine closed the connection"))
                return
            self._last_heard = time.monotonic()  # it answers: not hung
            try:
                frames = self._decoder.feed(data)
            except FrameError as exc:
                self._lost(exc)
                return
            for frame in frames:
                self._resolve(frame)

    def _resolve(self, frame: Frame) -> None:
        self._unanswered.pop(frame.ident, None)
        future = self._pending.get(frame.ident)
        if future is None or future.done():  # timed out already
            return
        if frame.kind in (ANSWER, METRICS_REPLY, ADMITTED):
            future.set_result(frame.payload)
        elif frame.kind == BUSY:
            future.set_exception(Overloaded(frame.number))
        elif frame.kind == RATE_LIMITED:
            future.set_exception(RateLimited(frame.number))
        else:
            future.set_exception(EngineRefused(frame.kind, frame.payload.decode("utf-8", "replace")))

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        """What the calls in flight fail with when the connection is lost for ``exc``."""
        return EngineUnavailable(f"the engine went away: {exc!r}")

    def _lost(self, exc: BaseException) -> None:
        """The engine is gone: fail what waits (the marked fallback); the next tick gets a new connection."""
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
        self._unsent = bytearray()
        self._unanswered.clear()
        error = self._unavailable(exc)
        if not self._closed:
            log.error("process %d lost its engine (%s); %d requests in flight get the fallback",
                      os.getpid(), error, len(self._pending))
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Stop talking to the engine: what waits fails with EngineUnavailable, submit raises BatcherClosed."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._lost(EOFError("closed"))


class EngineClient(EngineConnection):
    """A `--workers N` worker's connection to the shared engine listening at ``path`` (started by the supervisor)."""

    def __init__(self, path: str, exposition: Callable[[], bytes] = lambda: b"",
                 on_reconnect: Callable[[], None] | None = None):
        super().__init__(exposition)
        self.path = path
        self.on_reconnect = on_reconnect
        self.connections = 0

    def _reconnect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return
        self.attach(sock)
        self.connections += 1
        if self.connections > 1 and self.on_reconnect is not None:
            self.on_reconnect()
        log.info("worker %d connected to the engine at %s", os.getpid(), self.path)

    def health(self) -> dict[str, Any]:
        state = "connected" if self.connected else "reconnecting"
        return {"ok": self.connected,
                "detail": f"shared engine at {self.path}: {state}, {max(0, self.connections - 1)} reconnects"}
