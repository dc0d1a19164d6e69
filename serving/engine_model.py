"""The engine of ``engine_scope: model``: only the model runs here, fed packed rows by every worker.

With ``engine_scope: pipeline`` (the default) the engine runs the whole pipeline for every request of every worker
(state reads, rows, model, reranking, answers) on one Python thread, which bounds a GPU host at what that thread
can do: about 1,600 req/s for the ML-1M model on an H100, whose GPU time is 1-2 ms per batch of 125
(docs/SERVING.md). With ``engine_scope: model`` the workers, which scale with cores, do all of that themselves
(serving/remote_model.py) and send each batch's rows in the packed layout; the engine keeps what must be in one
place: the model, its KV cache and the batching across workers (vLLM's split of API server and engine core).

Each step takes every frame that has arrived (up to ``max_rows`` rows; no extra wait: the workers batched already),
groups them by served model, and submits each group with ``UGTInference.submit_packed``; up to ``depth`` steps are
in flight at once, so on CUDA the next step is packed and copied while the GPU runs the last one. Answers go back
in the order steps finish, one write per worker per step.

Live items (serving/live_items.py) are this engine's: it follows the feed, adds them to its model and table before
each step, and names every item past a worker's vocabulary in its answers (a frame of no rows, which a worker sends
when a history holds an id it does not know, is answered at once with only those). With stream vectors the live-item
events the workers found come in their frames and are counted here, before the rows run: the same order as the
pipeline's engine, so both scopes give the same answers (tests/serving/test_stream_scopes.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.engine_core import BUSY_RETRY_AFTER_S
from serving.engine_ipc import ADMITTED, BUSY, FAILED, MODEL_ANSWER, RATE_LIMITED, Frame, encode
from serving.live_stream import StreamEvents
from serving.model_wire import ModelRows, ModelTop, WireError, decode_rows, encode_top
from serving.ratelimit import RateLimiter

log = logging.getLogger(__name__)

POLL_S = 0.0002  # how often a step in flight is looked at when nothing else is waiting


@dataclass(slots=True)
class _Asked:
    conn: int
    ident: int
    rows: ModelRows


@dataclass(slots=True)
class _Step:
    """One step in flight: per served model its frames and its Pending batch."""

    groups: list[tuple[Any, list[_Asked], Any]] = field(default_factory=list)  # (generator, asked, pending)

    def ready(self) -> bool:
        return all(pending.ready() for _, _, pending in self.groups)


def _stack(asked: list[_Asked]) -> tuple[np.ndarray, np.ndarray, list[str | None], list[bytes], int]:
    """Every frame's rows as one batch: vectors (int64), exclusions padded to the widest, keys, prints, k."""
    vectors = np.concatenate([a.rows.vectors for a in asked]).astype(np.int64)
    width = max(a.rows.excl.shape[1] for a in asked)
    excl = np.zeros((len(vectors), 1 << max(width - 1, 0).bit_length()), dtype=np.int64)
    at = 0
    for a in asked:
        n, x = a.rows.excl.shape
        excl[at : at + n, :x] = a.rows.excl
        at += n
    keys = [key for a in asked for key in a.rows.keys]
    prints = [p for a in asked for p in a.rows.prints]
    return vectors, excl, keys, prints, max(a.rows.k for a in asked)


class ModelCore:
    """Admission (bounded queue in rows), steps across workers, and the answer frames, without any socket.

    ``models`` maps a route (serving.compose.served_generators' key) to its UGTGenerator; frames name theirs.
    """

    def __init__(self, models: dict[str, Any], *, max_rows: int, queue_max: int, depth: int = 2,
                 limiter: RateLimiter | None = None,
                 on_queue: Callable[[int], None] = lambda depth: None,
                 on_batch: Callable[[int], None] = lambda size: None,
                 on_refused: Callable[[str], None] = lambda reason: None):
        self.models = models
        self.limiter = limiter
        self.max_rows = max_rows
        self.queue_max = queue_max
        self.depth = depth
        self.on_queue, self.on_batch, self.on_refused = on_queue, on_batch, on_refused
        self.queue: deque[_Asked] = deque()
        self.queued_rows = 0
        self.inflight: deque[_Step] = deque()

    def admit_key(self, frame: Frame) -> bytes:
        """An ADMIT frame: the rate limit of its key (the payload), kept here for every worker at once."""
        wait = self.limiter.acquire(frame.payload.decode() or "anonymous") if self.limiter is not None else 0.0
        if wait > 0:
            self.on_refused("rate_limited")
            return encode(RATE_LIMITED, frame.ident, wait)
        return encode(ADMITTED, frame.ident)

    def admit(self, conn: int, frame: Frame) -> bytes | None:
        """Queue a MODEL frame, or the refusal to send back at once (a full queue, an unknown model)."""
        try:
            rows = decode_rows(frame.payload)
        except WireError as exc:
            return encode(FAILED, frame.ident, 0.0, str(exc).encode())
        if rows.route not in self.models:
            return encode(FAILED, frame.ident, 0.0, f"no served model {rows.route!r} in this engine".encode())
        if not rows.keys:  # only asks for the names of items added while serving
            generator = self.models[rows.route]
            generator.apply_new_items()
            empty = np.zeros((0, 0), np.int64)
            return encode(MODEL_ANSWER, frame.ident, 0.0, encode_top(_top(generator, rows.known, np.zeros(0, np.int64),
                                                                          empty, empty.astype(np.float32))))
        if self.queued_rows + len(rows.keys) > self.queue_max and self.queue:
            self.on_refused("queue_full")
            return encode(BUSY, frame.ident, BUSY_RETRY_AFTER_S)
        self.queue.append(_Asked(conn, frame.ident, rows))
        self.queued_rows += len(rows.keys)
        self.on_queue(self.queued_rows)
        return None

    def due_in(self) -> float | None:
        if self.queue and len(self.inflight) < self.depth:
            return 0.0
        if self.inflight:
            return 0.0 if self.inflight[0].ready() else POLL_S
        return None

    def run_due(self) -> dict[int, bytearray]:
        """Answer the steps that finished, then start the next one if there is room: frames by connection."""
        out: dict[int, bytearray] = {}
        while self.inflight and self.inflight[0].ready():
            self._finish(self.inflight.popleft(), out)
        if self.queue and len(self.inflight) < self.depth:
            self._start(out)
            while self.inflight and self.inflight[0].ready():  # on the CPU a step is done when submitted
                self._finish(self.inflight.popleft(), out)
        return out

    def _take(self) -> list[_Asked]:
        taken: list[_Asked] = []
        rows = 0
        while self.queue and (not taken or rows + len(self.queue[0].rows.keys) <= self.max_rows):
            asked = self.queue.popleft()
            rows += len(asked.rows.keys)
            taken.append(asked)
        self.queued_rows -= rows
        self.on_queue(self.queued_rows)
        self.on_batch(rows)
        return taken

    def _start(self, out: dict[int, bytearray]) -> None:
        by_route: dict[str, list[_Asked]] = {}
        for asked in self._take():
            by_route.setdefault(asked.rows.route, []).append(asked)
        step = _Step()
        for route, asked in by_route.items():
            generator = self.models[route]
            try:
                generator.apply_new_items()
                _observe(generator, asked)
                vectors, excl, keys, prints, k = _stack(asked)
                pending = generator.engine.submit_packed(vectors, excl, k, keys, prints)
            except Exception as exc:  # one model's failure fails its frames alone
                log.exception("engine step for %s failed", route)
                _refuse(asked, exc, out)
                continue
            step.groups.append((generator, asked, pending))
        if step.groups:
            self.inflight.append(step)

    def _finish(self, step: _Step, out: dict[int, bytearray]) -> None:
        for generator, asked, pending in step.groups:
            try:
                counts, indices, scores = pending.arrays()
            except Exception as exc:
                log.exception("engine step failed")
                _refuse(asked, exc, out)
                continue
            at = 0
            for a in asked:
                n = len(a.rows.keys)
                top = _top(generator, a.rows.known, counts[at : at + n], indices[at : at + n], scores[at : at + n])
                out.setdefault(a.conn, bytearray()).extend(encode(MODEL_ANSWER, a.ident, 0.0, encode_top(top)))
                at += n


def _top(generator: Any, known: int, counts: np.ndarray, indices: np.ndarray, scores: np.ndarray) -> ModelTop:
    """One frame's answer, with the ids of the items added while serving that the worker (``known`` items in its
    vocabulary) does not have yet: it then names every index and holds those items in its rows."""
    first = max(known, generator.num_items + 1)
    names = {i: generator.index_to_item[i] for i in range(first, len(generator.index_to_item))}
    return ModelTop(counts, indices, scores, names)


def _observe(generator: Any, asked: list[_Asked]) -> None:
    """Count the live-item events the workers found in their users' histories (stream vectors), before the rows
    of the same step run: the pipeline's engine counts a batch's events before its model call too."""
    if getattr(generator, "stream", None) is None:
        return
    events = StreamEvents()
    for a in asked:
        if a.rows.stream_users:
            events.extend(StreamEvents(list(a.rows.stream_users), a.rows.stream_items.tolist(),
                                       list(a.rows.stream_vectors)))
    if events.users:
        generator.stream.observe_packed(events)


def _refuse(asked: list[_Asked], exc: BaseException, out: dict[int, bytearray]) -> None:
    for a in asked:
        out.setdefault(a.conn, bytearray()).extend(
            encode(FAILED, a.ident, 0.0, f"the engine failed on this batch: {exc!r}".encode()))


def serve_model(models: dict[str, Any], config: Any, metrics: Any, hub: Any, *, path: str | None,
                parent_pid: int | None) -> None:
    """The engine loop (serving.engine_core.serve) around a :class:`ModelCore` for these models."""
    from serving.engine_core import serve

    refused = {reason: metrics.engine_refused.labels(reason) for reason in ("queue_full", "rate_limited")}
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst) if config.rate_limit_rps else None
    core = ModelCore(models, max_rows=config.engine_max_rows, queue_max=config.engine_queue_max, limiter=limiter,
                     on_queue=metrics.engine_queue.set, on_batch=metrics.batch_size.observe,
                     on_refused=lambda reason: refused[reason].inc())
    log.info("model engine serving %s (engine_scope: model)", sorted(models))
    serve(core, hub, path=path, parent_pid=parent_pid)  # type: ignore[arg-type]
