"""`ugt serve --workers N`: N HTTP worker processes and one engine process, kept alive by the `ugt serve` parent.

The shape of vLLM's API server + engine core. The parent composes the service once (config checked, model loaded
and compiled, Redis pinged), binds the listening socket, then forks:

* one **engine** (serving/engine_core.py, the same engine ``engine: process`` forks for its one HTTP process) that
  owns the model and batches the requests of every worker, with the per-key rate limit and the bounded queue
  (back-pressure) in one place;
* N **workers**, each a uvicorn server on the shared listening socket (the kernel spreads connections) whose app
  parses, validates, authenticates and answers, and hands the request to the engine over a Unix socket
  (serving/engine_ipc.py).

Then it supervises: a worker that dies is forked again (the others keep serving); an engine that dies is forked
again, and the workers answer the requests it had in flight with the marked fallback (``engine_unavailable``) and
reconnect. Each role is restarted at most once per RESTART_MIN_INTERVAL_S. SIGTERM / SIGINT stop everything.
A model on CUDA cannot be forked: then the parent's own copy is composed on the CPU and the engine is spawned
instead, loading the model on the GPU itself (serving/engine_spawn.py).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.compose import Runtime, domains_on_gpu, engine_main, model_pipeline, served_generators
from serving.config import ConfigError, ServingConfig
from serving.engine_ipc import EngineClient
from serving.engine_spawn import spawn_engine
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

RESTART_MIN_INTERVAL_S = 1.0
ENGINE = "engine"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on (bound once, in the parent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_forkable(runtime: Runtime) -> None:
    """ConfigError when the parent's own copy of a model runs on CUDA (its children are forked, and CUDA does not
    survive a fork); the CLI composes that copy with ``device: cpu`` and spawns a CUDA engine instead."""
    on_gpu = domains_on_gpu(served_generators(runtime.components, runtime.config))
    if on_gpu:
        raise ConfigError("the supervisor forks its workers, and CUDA does not survive a fork: compose its copy of "
                          f"the service with device: cpu and spawn the engine (domains {on_gpu} run on the GPU)")


def worker_main(runtime: Runtime, listener: socket.socket, path: str, replacement: bool) -> None:
    """In a forked worker: the app around the parent's runtime, its batcher a client of the shared engine."""
    import uvicorn

    from serving.app import app_for

    metrics = ServingMetrics()
    if replacement:
        metrics.worker_restarts.inc()
    runtime.service.use_metrics(metrics)  # the fallback answers given here are counted here
    client = EngineClient(path, exposition=metrics.render)
    worker = dataclasses.replace(runtime, metrics=metrics, batcher=client, engine="shared")
    if runtime.config.engine_scope == "model":  # this worker runs the pipeline; the engine only the model
        worker.pipeline = model_pipeline(worker, path)
    config = runtime.config
    server = uvicorn.Server(uvicorn.Config(app_for(worker), log_level=config.log_level, access_log=False))
    server.run(sockets=[listener])


class Supervisor:
    """Forks the engine and the workers, and forks again whichever dies, until told to stop."""

    def __init__(self, runtime: Runtime, listener: socket.socket, workers: int,
                 spawn_config: ServingConfig | None = None):
        """``spawn_config``: spawn the engine with this config (a model on CUDA) instead of forking it."""
        check_forkable(runtime)
        self.runtime = runtime
        self.spawn_config = spawn_config
        self.spawned: subprocess.Popen | None = None  # the spawned engine (reaped by os.wait like the rest)
        self.listener = listener
        self.workers = workers
        self.folder = Path(tempfile.mkdtemp(prefix="ugt-serve-"))
        self.path = str(self.folder / "engine.sock")
        self.children: dict[int, str | int] = {}  # pid -> ENGINE or the worker's slot
        self.started: dict[str | int, float] = {}
        self.engine_restarts = 0
        self.stopping = False

    def _fork(self, role: str | int, replacement: bool) -> None:
        wait = self.started.get(role, float("-inf")) + RESTART_MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # a role that dies at once is not forked in a tight loop
        self.started[role] = time.monotonic()
        parent = os.getpid()
        if role == ENGINE and self.spawn_config is not None:
            process = spawn_engine(self.runtime.settings, self.spawn_config, self.engine_restarts, self.path, parent)
            self.spawned = process
            self.children[process.pid] = role
            log.info("engine %d spawned (its model on the GPU)", process.pid)
            return
        pid = os.fork()
        if pid == 0:
            self._child(role, parent, replacement)
        self.children[pid] = role
        log.info("%s %d started", "engine" if role == ENGINE else f"worker {role}", pid)

    def _child(self, role: str | int, parent: int, replacement: bool) -> None:
        """In the child: never returns (os._exit: the parent's atexit handlers are not ours to run)."""
        code = 0
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            if role == ENGINE:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent stops us
                self.listener.close()
                engine_main(self.runtime, self.engine_restarts, path=self.path, parent_pid=parent)
            else:
                worker_main(self.runtime, self.listener, self.path, replacement)
        except BaseException:
            log.exception("%s failed", role)
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def run(self) -> int:
        """Start everything, replace what dies, stop on SIGTERM / SIGINT; the exit code of `ugt serve`."""
        gc.collect()
        gc.freeze()  # the model and tables stay shared with every child, out of the collector's passes
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            self._fork(ENGINE, replacement=False)
            for slot in range(self.workers):
                self._fork(slot, replacement=False)
            log.info("ugt serve: %d workers and one engine (%s)", self.workers, self.path)
            while self.children:
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
                self._reap(pid, status)
        finally:
            self._stop_children()
            shutil.rmtree(self.folder, ignore_errors=True)
        return 0

    def _reap(self, pid: int, status: int) -> None:
        role = self.children.pop(pid, None)
        if role is None or self.stopping:
            return
        name = "engine" if role == ENGINE else f"worker {role}"
        log.error("%s %d died (%s); starting another", name, pid, _describe(status))
        if role == ENGINE:
            self.engine_restarts += 1
        self._fork(role, replacement=True)

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _stop_children(self, timeout_s: float = 10.0) -> None:
        self._stop(signal.SIGTERM, None)
        deadline = time.monotonic() + timeout_s
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
            else:
                self.children.pop(pid, None)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
