"""A `--workers N` worker's UGT model when ``engine_scope: model``: rows built here, the model run by the engine.

The worker runs the whole pipeline itself (its own batcher thread: state reads, rows, reranking, answers), so that
work scales with the workers. For a UGT model it builds each batch's rows exactly as the in-process generator does
(:meth:`serving.ugt_generator.UGTGenerator.gather`: the same prepared-row cache, exclusions and KV-cache
fingerprints), packs them, and sends them to the engine in one frame over its own blocking Unix socket
(serving/model_wire.py); the engine's top-k comes back as item indices, named here from the same vocabulary.

Items added while serving are the engine's (it follows the feed): each answer names those past this worker's
vocabulary, which learns them, so its rows hold them and mask them as seen as the engine's own would; a batch whose
histories hold an id unknown here first asks the engine (a frame of no rows). With stream vectors, the live-item
events found while building rows travel with them and the engine counts them (serving/live_stream.py).

When the engine is gone or refuses (restarting, its queue full), the batch's users get a NoModelAnswer with the
reason (``engine_unavailable``, ``overloaded``), which the service answers with the marked popularity fallback.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Iterable, Set
from typing import Any

import numpy as np

from serving.engine_ipc import (
    BUSY,
    MODEL,
    MODEL_ANSWER,
    RECV_BYTES,
    EngineUnavailable,
    Frame,
    FrameDecoder,
    FrameError,
    encode,
)
from serving.generator import BatchAnswer, GenerationRequest, NoModelAnswer, ScoredItem
from serving.live_stream import StreamEvents, remember
from serving.model_wire import ModelRows, ModelTop, WireError, decode_top, encode_rows
from serving.service import ENGINE_UNAVAILABLE, OVERLOADED
from serving.ugt_generator import UGTGenerator
from serving.user_state_reader import UserStateView

log = logging.getLogger(__name__)

MAX_UNKNOWN = 100_000  # ids asked about that the engine did not know either; forgotten past this many


class EngineBusy(RuntimeError):
    """The engine's queue is full (back-pressure)."""


class ModelChannel:
    """One blocking connection to the engine's socket at ``path``; reconnects on the next call after a loss."""

    def __init__(self, path: str, timeout_s: float):
        self.path = path
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    def call(self, payload: bytes) -> bytes:
        """The MODEL_ANSWER payload for a MODEL frame; EngineUnavailable or EngineBusy otherwise."""
        with self.lock:
            ident = next(self.ids)
            try:
                sock = self._connected()
                sock.sendall(encode(MODEL, ident, 0.0, payload))
                frame = self._answer(sock, ident)
            except (OSError, EOFError, FrameError) as exc:  # socket.timeout is an OSError
                self.close()
                raise EngineUnavailable(f"the engine at {self.path} did not answer: {exc!r}") from exc
        if frame.kind == MODEL_ANSWER:
            return frame.payload
        if frame.kind == BUSY:
            raise EngineBusy(f"the engine's queue is full; retry in {frame.number:g} s")
        raise EngineUnavailable(frame.payload.decode("utf-8", "replace"))

    def _connected(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self.sock, self.decoder = sock, FrameDecoder()
        return self.sock

    def _answer(self, sock: socket.socket, ident: int) -> Frame:
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise EOFError("the engine closed the connection")
            for frame in self.decoder.feed(data):
                if frame.ident == ident:  # an older call's late answer (it timed out) is dropped
                    return frame

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class RemoteModel:
    """The generator a worker's service calls: ``local``'s rows and names, the engine's model (``route``)."""

    def __init__(self, local: UGTGenerator, route: str, channel: ModelChannel, prepared_users: int):
        self.local = local
        self.route = route
        self.channel = channel
        self.name, self.version = local.name, local.version
        local.prepared_capacity = prepared_users  # the parent's copy kept one: this worker's own row cache
        if local.stream is not None:
            local.stream_outbox = StreamEvents()  # the engine counts them: it owns the model and the table
        self.asked: set[str] = set()  # unknown ids asked about since the engine's catalog last grew

    def fresh_items(self, item_ids: Iterable[str]) -> set[str]:
        return self.local.fresh_items(item_ids)

    def recommend(self, state: UserStateView, k: int, exclude: Set[str], *, domain: str) -> list[ScoredItem]:
        answer = self.recommend_batch([GenerationRequest(state, k, frozenset(exclude), domain)])[0]
        if isinstance(answer, NoModelAnswer):
            raise answer
        return answer  # type: ignore[return-value]

    def recommend_batch(self, requests: list[GenerationRequest]) -> list[BatchAnswer]:
        self._learn_unknown(requests)
        batch = self.local.gather(requests)
        events = self._take_events()
        if not batch.rows:
            return batch.answers
        engine = self.local.engine
        rows = ModelRows(self.route, batch.k, batch.keys, batch.prints, engine.row_vectors(batch.rows),
                         engine.exclusion_matrix(batch.excludes), len(self.local.index_to_item), events.users,
                         np.asarray(events.items, np.int64), events.matrix(engine.width))
        try:
            top = decode_top(self.channel.call(encode_rows(rows)))
        except (EngineUnavailable, EngineBusy, WireError) as exc:
            reason = OVERLOADED if isinstance(exc, EngineBusy) else ENGINE_UNAVAILABLE
            for i in batch.where:
                batch.answers[i] = NoModelAnswer(reason, str(exc))
            return batch.answers  # the events were not counted: sent again when their users' rows are rebuilt
        remember(self.local.stream_sent, list(zip(events.users, events.items, strict=True)))
        names = self._names(top)
        for j, i in enumerate(batch.where):
            n = min(int(top.counts[j]), requests[i].k)
            pairs = zip(names[top.indices[j, :n]].tolist(), top.scores[j, :n].tolist(), strict=True)
            batch.answers[i] = [tuple.__new__(ScoredItem, pair) for pair in pairs]
        return batch.answers

    def _names(self, top: ModelTop) -> np.ndarray:
        """The index -> item id array, grown by the live items the engine named (kept for later batches)."""
        if self.local.learn_items(top.names):
            self.asked.clear()  # the catalog grew: an id unknown before may be served now
        return self.local.item_names

    def _take_events(self) -> StreamEvents:
        """The live-item events the batch's rows brought up (none without stream vectors)."""
        events = self.local.stream_outbox
        if events is None:
            return StreamEvents()
        self.local.stream_outbox = StreamEvents()
        return events

    def _learn_unknown(self, requests: list[GenerationRequest]) -> None:
        """When a history holds an id this worker does not know and has not asked about, ask the engine for the
        items it added (a frame of no rows): rows then hold them as the engine's own would. Best effort: an engine
        that does not answer is met again by the batch itself."""
        if self.local.live is None:  # no live catalog here: nothing to learn (and no set over every history)
            return
        vocab = self.local.item_to_index
        unknown = {i for r in requests for i in r.state.item_ids if i not in vocab and i not in self.asked}
        if not unknown:
            return
        if len(self.asked) > MAX_UNKNOWN:
            self.asked.clear()
        self.asked |= unknown
        engine = self.local.engine
        empty = ModelRows(self.route, 0, [], [], np.zeros((0, engine.width), np.int64), np.zeros((0, 1), np.int64),
                          len(self.local.index_to_item))
        try:
            self._names(decode_top(self.channel.call(encode_rows(empty))))
        except (EngineUnavailable, EngineBusy, WireError) as exc:
            log.debug("could not ask the engine for its new items: %s", exc)


def model_routes(served: dict[str, Any]) -> dict[str, UGTGenerator]:
    """Each UGT model once, under the first route that serves it (workers and engine agree: same config order)."""
    out: dict[str, UGTGenerator] = {}
    seen: set[int] = set()
    for route, generator in served.items():
        if isinstance(generator, UGTGenerator) and id(generator) not in seen:
            seen.add(id(generator))
            out[route] = generator
    return out


def use_remote_models(components: Any, served: dict[str, Any], channel: ModelChannel, prepared_users: int) -> int:
    """Put a RemoteModel in place of every UGT generator of ``components`` (in a worker); how many models."""
    remote = {id(gen): RemoteModel(gen, route, channel, prepared_users)
              for route, gen in model_routes(served).items()}

    def swap(generator: Any) -> Any:
        return remote.get(id(generator), generator)

    components.generator = swap(components.generator)
    components.generators = {domain: swap(gen) for domain, gen in components.generators.items()}
    components.arm_generators = {key: swap(gen) for key, gen in components.arm_generators.items()}
    return len(remote)
