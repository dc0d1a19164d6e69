"""Where an `engine_scope: model` HTTP worker's CPU per request goes, stage by stage, at a given history length.

Run with a source tree's own code (bench/worker_cpu_industrial.py starts it once per tree, history and pass):
the service's batch pipeline (``RecommendService.run_batch``: the pipelined state read and its decode, the history
sets, the UGT rows through :class:`serving.remote_model.RemoteModel` (``gather``: prepare, fingerprint,
exclusions), the packed rows, the exclusion matrix, the model frame, the answer's names, the reranker, the answer)
in one thread, on synthetic users' states (bench/e2e_users.py ``synthetic_users``, ``history - 64`` events each, or
half the history when it is shorter than 128)
stored in a real Redis in Feast's layout. The engine is a stand-in that answers every frame with a fixed top-k (its
own time is reported apart, not counted): what is measured is the worker's side only, with a random-weight
checkpoint of the given history (the worker never runs the model, so its size does not matter).

Each round runs the users three ways, in batches: a miss (the worker's row cache emptied first), a hit (the same
states again) and an append (one new event written to each user's stored state first, outside the timing). Per
kind: thread CPU per request of the whole batch call, and wall time per request of each stage (perf_counter around
the tree's own functions). Prints one JSON line. Usage:

  python -m bench.worker_stages CHECKPOINT REDIS_PORT USERS BATCH ROUNDS
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


class StandInChannel:
    """The engine's socket replaced by a fixed answer (k indices per row) per frame; counts the frames' bytes."""

    def __init__(self, k: int, items: int):
        self.k, self.items = k, items
        self.answers: dict[int, bytes] = {}
        self.sent_bytes = 0

    def call(self, payload: bytes) -> bytes:
        import orjson

        from serving.model_wire import ModelTop, encode_top

        self.sent_bytes += len(payload)
        size = int.from_bytes(payload[:4], "big")
        n = len(orjson.loads(payload[4 : 4 + size])["keys"])
        if n not in self.answers:
            rng = np.random.default_rng(n)
            indices = rng.choice(np.arange(1, self.items + 1), size=(n, self.k)).astype(np.int32)
            self.answers[n] = encode_top(ModelTop(np.full(n, self.k, np.int32), indices,
                                                  np.linspace(1, 0, n * self.k, dtype=np.float32).reshape(n, self.k),
                                                  {}))
        return self.answers[n]


def timed(spent: dict[str, float], name: str, func: Any) -> Any:
    """``func`` with its wall time added to ``spent[name]``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started

    return wrapper


def instrument(service: Any, remote: Any, spent: dict[str, float]) -> None:
    """Time the stages, where the tree has them (a function missing in one tree is left out)."""
    import serving.remote_model as remote_model
    import serving.ugt_generator as ugt_generator

    reader = service.parts.state_reader
    targets = [(reader, "read_many", "state_read"), (reader, "_view", "state_decode"),
               (service, "_seen", "history_sets"), (service, "_rerank", "rerank"),
               (remote, "_learn_unknown", "learn_unknown"), (remote.local, "gather", "gather"),
               (remote.local, "prepare", "gather_prepare"), (remote.local, "exclusions", "gather_exclusions"),
               (remote.local.engine, "row_vectors", "row_vectors"),
               (remote.local.engine, "exclusion_matrix", "exclusion_matrix"),
               (remote.channel, "call", "engine_stand_in"), (remote, "_names", "names")]
    for owner, attr, name in targets:
        if hasattr(owner, attr):
            setattr(owner, attr, timed(spent, name, getattr(owner, attr)))
    for module, attr, name in ((remote_model, "encode_rows", "encode_frame"),
                               (ugt_generator, "prefix_fingerprint", "gather_fingerprint"),  # trees up to b01720d
                               (ugt_generator, "prefix_hash", "gather_fingerprint"),  # later: a hash an append extends
                               (ugt_generator, "extend_hash", "gather_fingerprint"),
                               (ugt_generator, "fingerprint_from", "gather_fingerprint")):
        if hasattr(module, attr):
            setattr(module, attr, timed(spent, name, getattr(module, attr)))


def build(checkpoint: str, users: int) -> tuple[Any, Any, StandInChannel]:
    """The service of a worker (popularity fallback, the default reranker) with a RemoteModel as its generator."""
    import serving.compose as compose
    from infra.settings import get_settings
    from serving.app import create_app
    from serving.config import ServingConfig
    from serving.remote_model import RemoteModel
    from serving.ugt_generator import UGTGenerator

    config = ServingConfig(generator="popularity", engine="thread", log_level="warning")
    service = create_app(get_settings(), config).state.service
    local = UGTGenerator(Path(checkpoint), kv_cache_users=0, device="cpu")
    channel = StandInChannel(10, local.num_items)
    remote = RemoteModel(local, "movie", channel, prepared_users=users + 1)  # type: ignore[arg-type]
    service.parts.generator = remote
    service.parts.generators = {domain: remote for domain in service.parts.generators} | {"movie": remote}
    keep_states = getattr(compose, "keep_states", None)  # as a worker's compose does (a tree that has it)
    if keep_states is not None:
        keep_states(service.parts.state_reader, {"movie": local})
    return service, remote, channel


def run(checkpoint: str, redis_port: int, n_users: int, batch: int, rounds: int) -> dict[str, Any]:
    import asyncio

    import redis

    from bench.e2e_industrial import item_name
    from bench.e2e_users import synthetic_users
    from bench.state_bytes import StateWriter
    from infra.feast_store import FeastRedisLayout
    from serving.batcher import Queued
    from serving.http_models import RecommendRequest

    service, remote, channel = build(checkpoint, n_users)
    history = remote.local.max_len
    names = np.asarray([item_name(i) for i in range(remote.local.num_items)], dtype=object)
    room = min(64, history // 2)  # new events that fit before the window slides
    users = synthetic_users(n_users, names, history, history - room, room, seed=0)
    client = redis.Redis(port=redis_port)
    users.write_initial(client, chunk=256)
    writer = StateWriter(client, FeastRedisLayout("ugt"))
    loop = asyncio.new_event_loop()
    requests = [RecommendRequest(user_id=u) for u in users.ids]
    spent: dict[str, float] = defaultdict(float)
    instrument(service, remote, spent)
    best: dict[str, dict[str, float]] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for kind in ("miss", "hit", "append"):
            if kind == "miss":  # users this worker has not seen: no row, no kept state (a tree that keeps them)
                remote.local.prepared.clear()
                getattr(service.parts.state_reader, "recent", {}).clear()
            if kind == "append":
                writer.write([users.append_row(u) for u in range(n_users)])
            spent.clear()
            channel.sent_bytes = 0
            started = time.thread_time()
            for lo in range(0, n_users, batch):
                entries = [Queued(req, time.perf_counter(), None, loop) for req in requests[lo:lo + batch]]
                answers = service.run_batch(entries)
                assert all(a.reason is None for a in answers), [a.reason for a in answers][:3]
            total = time.thread_time() - started
            row = {"cpu_us": 1e6 * total / n_users, "frame_bytes": channel.sent_bytes / n_users}
            row |= {name: 1e6 * s / n_users for name, s in spent.items()}
            if r and (kind not in best or row["cpu_us"] < best[kind]["cpu_us"]):
                best[kind] = row
    client.close()
    mean_events = float(np.mean([len(users.row(u)["recent_item_ids"]) for u in range(min(n_users, 50))]))
    return {"history": history, "mean_events": round(mean_events, 1), "users": n_users, "batch": batch,
            "stages": {kind: {k: round(v, 2) for k, v in row.items()} for kind, row in best.items()}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    checkpoint, port, users, batch, rounds = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    os.environ |= {"UGT_REDIS_PORT": str(port), "UGT_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    print(json.dumps(run(checkpoint, port, users, batch, rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
