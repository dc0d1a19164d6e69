"""Stream vectors give the same answers with ``engine_scope: pipeline`` and ``engine_scope: model``.

A tiny UGT that embeds items by semantic ID and scores live items by their stream vectors (``embedding.stream_k``),
new items announced on the item job's feed in a Redis of this test, and the same requests asked of the one-process
generator (the pipeline's engine) and of a worker's RemoteModel whose model runs in a forked engine process
(serving/engine_model.py, over its Unix socket): same items, same scores, also after users' events on the new
items moved their rows. What fails without the model scope's wiring: the worker drops the new items from histories
(its vocabulary lacks them) and nobody counts their events, so its answers differ and the rows never move.

Also here, on the same model and feed: the reranker's fresh-item exploration (rerank key fresh_slots) puts the live
items the generator scored into its candidate pool into answers, within the bound.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from contracts.redis_keys import code_string, feed_entry, index_key
from contracts.user_state_rule import STATE_VERSION
from jobs.item_semantic_ids_logic import RedisSidIndex
from serving.generator import GenerationRequest
from serving.user_state_reader import UserStateView

pytestmark = pytest.mark.integration  # a real redis-server of its own (no stack)

SIZES = [8, 8, 64]
BASE_MS = 1_750_000_000_000
HISTORY = ["50", "181", "100", "258", "1", "286", "294", "121"]
ROUTE = "movie"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=15)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One epoch of the tiny UGT with item_repr id+sid and stream vectors on (stream_k 4), synthetic codes."""
    from contracts.datasets import load_dataset
    from models.train import fit
    from models.train_config import load_config

    out = tmp_path_factory.mktemp("ugt-stream")
    items = [str(i) for i in load_dataset("ml-100k").items["item_id"]]
    order = np.random.default_rng(0).permutation(len(items))
    codes = np.stack([order % 8, (order // 8) % 8, order // 64], 1)
    np.savez(out / "sid.npz", codes=codes, item_ids=np.asarray(items), codebook_sizes=np.asarray(SIZES))
    cfg = load_config("models/configs/ugt_ml100k_tiny.yaml", {
        "out_dir": str(out), "progress": False, "device": "cpu", "max_epochs": 1, "max_users": 400,
        "model_config.embedding.item_repr": "id+sid", "model_config.embedding.stream_k": 4.0,
        "semantic_ids": {"artifact": str(out / "sid.npz")}})
    fit(cfg)
    return out / "checkpoint.pt"


@pytest.fixture
def feed(redis_port: int, checkpoint: Path) -> Iterator[str]:
    """A fresh version's decode index (the checkpoint's codes) and two new items announced on its feed."""
    from models.checkpoint import load_checkpoint

    client = redis.Redis(port=redis_port)
    version = f"itest-stream-{uuid.uuid4().hex[:8]}"
    _, _, _, ckpt = load_checkpoint(checkpoint)
    index = RedisSidIndex(client, version)
    index.write((item, code_string(ckpt["semantic_codes"][i])) for item, i in ckpt["vocab"].items())
    taken = {c.decode() for c in client.hkeys(index_key(version))}
    free = [c for c in np.ndindex(*SIZES) if code_string(c) not in taken][-2:]
    index.write_new([feed_entry({"item_id": "new-a", "genres": ["Drama"], "year": 2001}, code_string(free[0])),
                     feed_entry({"item_id": "new-b", "genres": ["Comedy"], "year": 1999}, code_string(free[1]))])
    yield version
    client.flushdb()


def view(user: str, items: list[str]) -> UserStateView:
    times = [BASE_MS + n * 60_000 for n in range(len(items))]
    return UserStateView(user_id=user, item_ids=tuple(items), action_tokens=(2,) * len(items),
                         rating_tokens=(8,) * len(items), event_times=tuple(times), event_count=len(items),
                         last_event_time=times[-1], state_version=STATE_VERSION)


def generator(checkpoint: Path, version: str, port: int):
    from serving.ugt_generator import UGTGenerator

    return UGTGenerator(checkpoint, clock=lambda: BASE_MS / 1000 + 3600, live_items=4, sid_version=version,
                        redis_factory=lambda: redis.Redis(port=port, socket_timeout=5))


def engine_child(model, path: str) -> None:
    """The forked engine: follows the feed and serves the model frames at ``path`` (as `ugt serve` forks it)."""
    from serving.config import ServingConfig
    from serving.engine_core import MetricsHub
    from serving.engine_model import serve_model
    from serving.metrics import ServingMetrics

    model.start_background()
    metrics = ServingMetrics()
    serve_model({ROUTE: model}, ServingConfig(), metrics, MetricsHub(metrics.render), path=path, parent_pid=None)


def ask(gen, users: list[UserStateView], k: int) -> list[list[tuple[str, float]]]:
    answers = gen.recommend_batch([GenerationRequest(u, k, frozenset(), ROUTE) for u in users])
    assert all(isinstance(a, list) for a in answers), answers
    return [[(item, score) for item, score in a] for a in answers]


def assert_same(one: list[list[tuple[str, float]]], two: list[list[tuple[str, float]]]) -> None:
    assert [[i for i, _ in a] for a in one] == [[i for i, _ in a] for a in two]
    for a, b in zip(one, two, strict=True):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as `ugt serve` sets (torch_threads: 1): an OpenMP pool does not survive the fork."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def serving_live_items(checkpoint: Path, feed: str, redis_port: int):
    """A generator on the feed, started, once it serves the feed's two live items."""
    gen = generator(checkpoint, feed, redis_port)
    gen.start_background()
    served, deadline = 0, time.monotonic() + 30
    while served < 2 and time.monotonic() < deadline:
        served += gen.apply_new_items()
        time.sleep(0.01)
    assert served == 2, gen.live.stats
    return gen


def test_both_scopes_give_the_same_answers_as_stream_rows_move(checkpoint: Path, feed: str, redis_port: int,
                                                                tmp_path, one_thread):
    from serving.remote_model import ModelChannel, RemoteModel

    deadline = time.monotonic() + 30  # the engine's waits below are counted from here
    pipeline = serving_live_items(checkpoint, feed, redis_port)

    model_copy = generator(checkpoint, feed, redis_port)  # the parent's copy: the engine forks it, a worker uses it
    path = str(tmp_path / "engine.sock")
    child = multiprocessing.get_context("fork").Process(target=engine_child, args=(model_copy, path), daemon=True)
    child.start()
    channel = ModelChannel(path, timeout_s=10.0)
    try:
        while not os.path.exists(path):
            assert child.is_alive() and time.monotonic() < deadline + 30, "the engine did not start"
            time.sleep(0.05)
        worker = RemoteModel(model_copy, ROUTE, channel, prepared_users=0)
        plain = view("plain", HISTORY)
        watched = [view("u1", [*HISTORY, "new-a", "7"]), view("u2", ["3", "new-b", *HISTORY, "new-a"])]
        everything = pipeline.num_items + 2
        probes = [view("probe-a", ["new-a", *HISTORY]), view("probe-b", ["new-b", *HISTORY])]  # first: not counted
        while "new-b" not in model_copy.item_to_index:  # the engine follows its own feed: wait until it serves both
            worker.recommend_batch([GenerationRequest(u, 1, frozenset(), ROUTE) for u in probes])  # may be refused
            assert time.monotonic() < deadline + 60, "the engine did not serve the new items"
            time.sleep(0.05)

        first = ask(pipeline, [plain], everything)
        assert_same(first, ask(worker, [plain], everything))
        assert_same(ask(pipeline, watched, 20), ask(worker, watched, 20))  # their events count here
        after = ask(pipeline, [plain], everything)
        assert_same(after, ask(worker, [plain], everything))
        before_a, after_a = dict(first[0])["new-a"], dict(after[0])["new-a"]
        assert abs(after_a - before_a) > 1e-4  # new-a's row moved toward its users' states
        assert pipeline.stream.sums.counts[pipeline.item_to_index["new-a"]] == 2  # u1 and u2
        seen = [item for item, _ in ask(worker, watched[:1], everything)[0]]
        assert "new-a" not in seen and "new-b" in seen  # a live item in the history is masked in both
        assert_same(ask(pipeline, watched, 20), ask(worker, watched, 20))  # asked again: counted once
        assert_same(ask(pipeline, [plain], everything), ask(worker, [plain], everything))
    finally:
        channel.close()
        child.terminate()
        child.join(10)
        pipeline.live.stop()


def test_exploration_puts_live_items_from_the_pool_into_answers_within_the_bound(checkpoint: Path, feed: str,
                                                                               redis_port: int, one_thread):
    from serving.reranker import FilterReranker, FreshExplorer

    gen = serving_live_items(checkpoint, feed, redis_port)
    k, pool = 10, (gen.num_items + 2) // 10 + 1  # a pool of the whole catalog: both live items are candidates
    users = [view(f"x{n}", HISTORY[n % 5 :] + ["7", "12"][: n % 3]) for n in range(12)]
    reranker = FilterReranker(pool, FreshExplorer(1))
    fresh_answers = 0
    try:
        for user, candidates in zip(users, ask(gen, users, gen.num_items + 2), strict=True):
            pool_items = [item for item, _ in candidates]
            fresh = gen.fresh_items(pool_items)
            assert fresh == {"new-a", "new-b"}  # what the generator calls live
            picked = reranker.rerank(_scored(candidates), k, set())
            out, placed = reranker.fresh.explore(picked, _scored(candidates), k, set(), fresh, f"{user.user_id}|1")
            got = [i.item_id for i in out]
            assert len(got) == k and sum(i in fresh for i in got) <= 1  # the bound
            assert placed == (1 if fresh and not fresh & {i.item_id for i in picked} else 0)
            fresh_answers += any(i in fresh for i in got)
            if placed:  # the best-scored live item of the pool
                assert set(got) & fresh == {next(i for i in pool_items if i in fresh)}
        assert fresh_answers == len(users)
    finally:
        gen.live.stop()


def _scored(candidates: list[tuple[str, float]]):
    from serving.generator import ScoredItem

    return [ScoredItem(item, score) for item, score in candidates]
