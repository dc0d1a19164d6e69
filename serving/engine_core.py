"""The engine process: one process owns the model and batches the requests of every HTTP process.

``engine: process`` is one HTTP process and its forked engine (serving/engine_process.py); ``ugt serve --workers
N`` is N HTTP workers and the supervisor's engine (serving/supervisor.py). The engine is the same in both: each
HTTP process's end (serving/engine_ipc.py's :class:`EngineConnection`) is a connection here. The engine runs one
thread: it reads every frame that has arrived from every connection, admits each request (the rate limit of its
API key, kept here so it holds across all workers; the bounded queue, back-pressure), and runs a batch when it is
full or its first request has waited ``max_wait_s`` (the :class:`serving.batcher.DynamicBatcher` rule), through
``RecommendService.run_batch``: one pipelined state read and one model call for the requests of all of them.

:class:`EngineCore` is those decisions without sockets (unit-tested); :func:`serve` is the socket loop around it.
Prometheus: each HTTP process sends its own exposition with each scrape (and a worker pushes it every second);
:class:`MetricsHub` keeps the latest per process, and the last one of each worker that went away, and answers a
scrape with everything added up (counters and histograms summed, gauges not: :func:`serving.metrics.merge_expositions`).
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from serving.batcher import Queued, check_limits, run_process
from serving.engine_ipc import (
    ADMIT,
    ANSWER,
    BUSY,
    FAILED,
    METRICS,
    METRICS_PUSH,
    METRICS_REPLY,
    MODEL,
    NO_POPULARITY,
    RATE_LIMITED,
    RECV_BYTES,
    REQUEST,
    UNKNOWN_DOMAIN,
    Frame,
    FrameDecoder,
    FrameError,
    encode,
)
from serving.http_models import RecommendRequest
from serving.metrics import merge_expositions
from serving.ratelimit import RateLimiter

log = logging.getLogger(__name__)

BUSY_RETRY_AFTER_S = 1.0
_CONN_IDS = itertools.count(1)
PARENT_CHECK_EVERY_S = 1.0


@dataclass(slots=True)
class Waiting:
    """A request in the engine's queue: which worker connection asked, under which id, and the request."""

    conn: int
    ident: int
    entry: Queued[RecommendRequest]


class Core(Protocol):
    """What the socket loop drives: :class:`EngineCore`, or serving.engine_model.ModelCore (engine_scope: model)."""

    def admit(self, conn: int, frame: Frame) -> bytes | None: ...

    def due_in(self) -> float | None: ...

    def run_due(self) -> dict[int, bytearray]: ...


class MetricsHub:
    """Every worker's latest exposition (by pid) plus the summed last words of workers that went away."""

    def __init__(self, render_own: Callable[[], bytes]):
        self.render_own = render_own
        self.latest: dict[int, bytes] = {}
        self.retired = b""

    def update(self, pid: int, exposition: bytes) -> None:
        self.latest[pid] = exposition

    def retire(self, pid: int) -> None:
        """A worker died: keep its counters in the totals (its replacement starts from zero)."""
        last = self.latest.pop(pid, None)
        if last:
            self.retired = merge_expositions(self.retired, last)

    def render(self) -> bytes:
        return merge_expositions(self.render_own(), *self.latest.values(), self.retired)


class EngineCore:
    """Admission (rate limit, bounded queue), batching and the answer frames, without any socket."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Queued[Any]]], Sequence[Any]],
        *,
        max_size: int,
        max_wait_s: float,
        queue_max: int,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_queue: Callable[[int], None] = lambda depth: None,
        on_batch: Callable[[int], None] = lambda size: None,
        on_refused: Callable[[str], None] = lambda reason: None,
    ):
        check_limits(max_size, max_wait_s)
        self.on_batch = on_batch
        self.on_refused = on_refused
        self.run_batch = run_batch
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.queue_max = queue_max
        self.limiter = limiter
        self.clock = clock
        self.on_queue = on_queue
        self.queue: deque[Waiting] = deque()

    def admit(self, conn: int, frame: Frame) -> bytes | None:
        """Queue a REQUEST frame, or return the refusal to send back at once (rate limit, then a full queue)."""
        message = orjson.loads(frame.payload)
        if self.limiter is not None:
            wait = self.limiter.acquire(message.get("key") or "anonymous")
            if wait > 0:
                self.on_refused("rate_limited")
                return encode(RATE_LIMITED, frame.ident, wait)
        if len(self.queue) >= self.queue_max:
            self.on_refused("queue_full")
            return encode(BUSY, frame.ident, BUSY_RETRY_AFTER_S)
        request = RecommendRequest.model_construct(**message["request"])  # validated by the worker
        self.queue.append(Waiting(conn, frame.ident, Queued(request, frame.number, None, None)))  # type: ignore[arg-type]
        self.on_queue(len(self.queue))
        return None

    def due_in(self) -> float | None:
        """Seconds until a batch must run (0: now), None when nothing waits."""
        if not self.queue:
            return None
        if len(self.queue) >= self.max_size:
            return 0.0
        return max(0.0, self.queue[0].entry.arrived + self.max_wait_s - self.clock())

    def run_due(self) -> dict[int, bytearray]:
        """Run one batch if one is due: its answer frames by connection (one write per worker per batch)."""
        if self.due_in() != 0.0:
            return {}
        batch = [self.queue.popleft() for _ in range(min(self.max_size, len(self.queue)))]
        self.on_queue(len(self.queue))
        self.on_batch(len(batch))
        results, errors = run_process(self.run_batch, [w.entry for w in batch])
        out: dict[int, bytearray] = {}
        for waiting, result, error in zip(batch, results, errors, strict=True):
            out.setdefault(waiting.conn, bytearray()).extend(answer_frame(waiting.ident, result, error))
        return out


def answer_frame(ident: int, result: Any, error: BaseException | None) -> bytes:
    """One request's answer as a frame: the JSON body, or the kind of refusal and its message."""
    from serving.fallback import NoPopularity
    from serving.service import UnknownDomain

    if error is None and isinstance(result, UnknownDomain):
        return encode(UNKNOWN_DOMAIN, ident, 0.0, str(result).encode())
    if error is None and isinstance(result, NoPopularity):
        return encode(NO_POPULARITY, ident, 0.0, str(result).encode())
    if error is None:
        try:
            return encode(ANSWER, ident, 0.0, result.to_json() if hasattr(result, "to_json") else bytes(result))
        except Exception as exc:  # one answer that cannot be encoded fails alone
            error = exc
    return encode(FAILED, ident, 0.0, f"the engine failed on this request: {error!r}".encode())


class _Connection:
    """One worker's connection as the engine holds it."""

    def __init__(self, sock: socket.socket, conn_id: int):
        self.sock = sock
        self.conn_id = conn_id  # never reused (a file number is): answers of a dropped worker go nowhere
        self.decoder = FrameDecoder()
        self.pid: int | None = None


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)  # a dead engine's socket file
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(256)
    listener.setblocking(False)
    return listener


def serve(core: Core, hub: MetricsHub, *, path: str | None = None, sock: socket.socket | None = None,
          parent_pid: int | None = None) -> None:
    """Answer the HTTP processes until the parent is gone: the workers that connect to ``path`` (`--workers N`),
    or the one HTTP process at the other end of ``sock`` (``engine: process``: then the engine also ends when
    that socket closes, so it never outlives the HTTP process)."""
    selector = selectors.DefaultSelector()
    connections: dict[int, _Connection] = {}
    listener = _listen(path) if path is not None else None
    if listener is not None:
        selector.register(listener, selectors.EVENT_READ, None)
    if sock is not None:
        _add(sock, selector, connections)
    last_parent_check = time.monotonic()
    log.info("engine %d serving %s", os.getpid(), path or "its HTTP process")
    while listener is not None or connections:
        due = core.due_in()
        for key, _ in selector.select(PARENT_CHECK_EVERY_S if due is None else due):
            if key.data is None and listener is not None:
                _accept(listener, selector, connections)
            else:
                _read(connections, key.data, core, hub, selector)
        for conn_id, data in core.run_due().items():
            _send(connections, conn_id, bytes(data), hub, selector)
        if parent_pid is not None and time.monotonic() - last_parent_check > PARENT_CHECK_EVERY_S:
            last_parent_check = time.monotonic()
            if os.getppid() != parent_pid:
                log.warning("engine %d: its parent is gone, exiting", os.getpid())
                return


def _accept(listener: socket.socket, selector: selectors.BaseSelector, connections: dict[int, _Connection]) -> None:
    try:
        sock, _ = listener.accept()
    except BlockingIOError:
        return
    _add(sock, selector, connections)


def _add(sock: socket.socket, selector: selectors.BaseSelector, connections: dict[int, _Connection]) -> None:
    sock.setblocking(False)
    conn_id = next(_CONN_IDS)
    connections[conn_id] = _Connection(sock, conn_id)
    selector.register(sock, selectors.EVENT_READ, conn_id)


def _read(connections: dict[int, _Connection], conn_id: int, core: Core, hub: MetricsHub,
          selector: selectors.BaseSelector) -> None:
    """Everything this worker has sent: requests admitted or refused at once, metrics kept or answered."""
    conn = connections.get(conn_id)
    if conn is None:
        return
    replies = bytearray()
    try:
        while True:
            try:
                data = conn.sock.recv(RECV_BYTES)
            except BlockingIOError:
                break
            if not data:
                raise EOFError("the worker closed the connection")
            for frame in conn.decoder.feed(data):
                replies += _handle(conn, conn_id, frame, core, hub)
    except (OSError, EOFError, FrameError, ValueError) as exc:
        _drop(connections, conn_id, hub, selector, exc)
        return
    if replies:
        _send(connections, conn_id, bytes(replies), hub, selector)


def _handle(conn: _Connection, conn_id: int, frame: Frame, core: Core, hub: MetricsHub) -> bytes:
    if frame.kind in (REQUEST, MODEL):  # a whole request (engine_scope: pipeline), or rows (model)
        return core.admit(conn_id, frame) or b""
    admit_key = getattr(core, "admit_key", None)  # only the model engine keeps the rate limit for ADMIT frames
    if frame.kind == ADMIT and admit_key is not None:
        return admit_key(frame)
    if frame.kind in (METRICS, METRICS_PUSH):
        conn.pid = int(frame.number)
        hub.update(conn.pid, frame.payload)
        if frame.kind == METRICS:
            return encode(METRICS_REPLY, frame.ident, 0.0, hub.render())
        return b""
    raise FrameError(f"unknown frame kind {frame.kind}")


def _send(connections: dict[int, _Connection], conn_id: int, data: bytes, hub: MetricsHub,
          selector: selectors.BaseSelector) -> None:
    """Blocking send of a batch's answers to one worker (its event loop reads them at once)."""
    conn = connections.get(conn_id)
    if conn is None:
        return  # the worker went away: nobody waits for these answers
    try:
        conn.sock.setblocking(True)
        conn.sock.settimeout(5.0)
        conn.sock.sendall(data)
        conn.sock.setblocking(False)
    except OSError as exc:
        _drop(connections, conn_id, hub, selector, exc)


def _drop(connections: dict[int, _Connection], conn_id: int, hub: MetricsHub, selector: selectors.BaseSelector,
          exc: BaseException) -> None:
    conn = connections.pop(conn_id, None)
    if conn is None:
        return
    try:
        selector.unregister(conn.sock)
    except (KeyError, ValueError):
        pass
    conn.sock.close()
    if conn.pid is not None:
        hub.retire(conn.pid)
    log.info("engine %d: worker connection %s closed (%r)", os.getpid(), conn.pid, exc)
