"""``engine: process``: the HTTP process forks its own engine, the `--workers 1` case of the shared engine.

In the default ``engine: thread`` mode the batcher thread (state read, model, rerank) and the event loop
(HTTP) share one GIL: on a 2-core box the model's Python between torch ops and the HTTP parsing of the
next requests take turns, and every hand-over costs up to the switch interval (docs/SERVING.md measured
~10 ms of that at 1,000 req/s). ``engine: process`` forks the built service after start-up (the model is
already loaded, copy-on-write) into a child with its own interpreter and GIL, which runs the same engine as
`ugt serve --workers N` (serving/engine_core.py: admission, the global rate limit, batching, the metrics hub)
over one socket pair instead of a Unix socket, with the same binary frames (serving/engine_ipc.py):

* the HTTP process keeps only the event loop: it validates a request, writes its fields to the engine, and the
  loop's reader resolves the waiting handler when the answer (already serialized to JSON by the engine) comes back;
* :class:`EngineProcess` is that HTTP end (an :class:`serving.engine_ipc.EngineConnection`) plus what owning the
  engine adds: forking it, forking it again when it dies (at most once per RESTART_MIN_INTERVAL_S; the requests in
  flight fail with EngineUnavailable, which the HTTP layer answers with the marked fallback), and killing an
  engine that answers nothing for ``hang_timeout_s`` while asked.

The engine exits when its socket closes (or its parent is gone), so it never outlives the HTTP process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from serving.engine_ipc import EngineConnection, EngineUnavailable

log = logging.getLogger(__name__)

RESTART_MIN_INTERVAL_S = 1.0  # a crashing engine is re-forked at most this often

# in the child: serve the HTTP process at the other end of the socket until it closes; the int is how many
# engines were forked again before this one (the engine counts ugt_serving_engine_restarts_total)
EngineMain = Callable[[socket.socket, int], None]


def _engine_child(engine_main: EngineMain, sock: socket.socket, parent_end: socket.socket, restarts: int) -> None:
    """The forked engine's first and last frame: never returns (os._exit: the parent's atexit handlers and
    finalizers are not ours to run)."""
    code = 0
    try:
        parent_end.close()  # so the parent closing its end reads as EOF here
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the HTTP process shuts us down
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not uvicorn's handler, which would only flag its loop
        signal.set_wakeup_fd(-1)
        engine_main(sock, restarts)
    except BaseException:
        log.exception("the engine process failed")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class EngineProcess(EngineConnection):
    """The HTTP process's engine in a forked child: ``start`` forks it, ``submit`` asks it, ``close`` ends it.

    ``engine_main(sock, restarts)`` runs in each new child (fresh metrics, then
    :func:`serving.engine_core.serve` on ``sock``). The HTTP process pushes no metrics: it sends its exposition
    with each scrape, and nothing of it would outlive the engine anyway.
    """

    push_metrics = False

    def __init__(self, engine_main: EngineMain, *, hang_timeout_s: float = 10.0,
                 exposition: Callable[[], bytes] = lambda: b"", name: str = "ugt-engine"):
        super().__init__(exposition)
        self.engine_main = engine_main
        self.hang_timeout_s = hang_timeout_s
        self.name = name
        self._child: multiprocessing.process.BaseProcess | None = None
        self._last_start = float("-inf")
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def _reconnect(self) -> None:
        """Fork an engine (the first, or a new one for a dead one) and talk to it over a new socket pair."""
        if time.monotonic() < self._last_start + RESTART_MIN_INTERVAL_S:
            return  # an engine that dies at once is not forked in a tight loop
        if self._child is not None:
            self.restarts += 1
        ours, theirs = socket.socketpair()
        child = multiprocessing.get_context("fork").Process(
            target=_engine_child, args=(self.engine_main, theirs, ours, self.restarts), name=self.name, daemon=True
        )
        self._last_start = time.monotonic()
        child.start()
        theirs.close()
        self._child = child
        self.attach(ours)
        log.info("engine process %d started", child.pid)

    def _connected_tick(self) -> None:
        """Every tick: a dead engine is let go, and one that has written nothing for hang_timeout_s while a call
        it has not answered waited that long is killed (and so forked again); those requests have had their
        timeout fallback long before. An idle engine (everything answered) is never killed, however long it idles."""
        super()._connected_tick()
        if self._child is not None and not self._child.is_alive():  # dead, though its socket is open elsewhere
            self._lost(EOFError("the engine process is gone"))
            return
        if not self._unanswered or self._child is None:
            return
        oldest = next(iter(self._unanswered.values()))
        silent = time.monotonic() - max(oldest, self._last_heard)
        if silent > self.hang_timeout_s and self._child.is_alive():
            log.error("engine process %d answered nothing for %.1f s while asked (%d calls unanswered): "
                      "killing it (a new one is forked)", self._child.pid, silent, len(self._unanswered))
            self._unanswered.clear()
            self._child.kill()  # its socket closes: the reader sees EOF, and the next tick forks another

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        """Reap the dead engine (its socket closed) and say how it ended."""
        if self._closed or self._child is None:
            return EngineUnavailable("the engine is closed")
        self._child.join(timeout=1.0)
        if self._child.is_alive():  # its socket closed but it lives on: it is of no use any more
            self._child.kill()
            self._child.join(timeout=1.0)
        return EngineUnavailable(f"engine process died (exit code {self._child.exitcode}; {exc!r})")

    def health(self) -> dict[str, Any]:
        """Up (its socket open and the process alive) or restarting, and how often it was forked again."""
        alive = self.connected and self._child is not None and self._child.is_alive()
        state = "up" if alive else "restarting"
        return {"ok": alive, "detail": f"engine process {self.pid} {state}, {self.restarts} restarts"}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine: closing its socket ends it after the batch it is running."""
        super().close(timeout)
        if self._child is not None:
            self._child.join(timeout)
            if self._child.is_alive():
                self._child.terminate()
                self._child.join(timeout)
