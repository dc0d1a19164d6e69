"""RedisDedupStore on the stack's real Redis: parallel workers give new items collision-free, idempotent IDs.

Threads (two connections) and, closer to two Flink instances, two OS processes released at once by a barrier,
racing on items that all share ONE prefix (so only the dedup level can tell them apart); and the job's own path
(jobs.item_semantic_ids_logic.redis_assigner, what every parallel instance of item_semantic_ids runs) in two
processes on near-duplicate items of a real artifact.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import uuid

import numpy as np
import pytest
import redis

from infra.settings import Settings
from models.semantic_ids.dedup import (
    DedupAllocator,
    DedupOverflowError,
    RedisDedupStore,
    assign_dedup,
    seed_rows,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def namespace(stack: Settings):
    client = redis.Redis.from_url(stack.redis_url)
    client.ping()
    name = f"test:sid:{uuid.uuid4().hex[:8]}"
    yield name
    for key in client.scan_iter(f"{name}:*"):
        client.delete(key)


def test_two_workers_share_redis_without_collisions(stack: Settings, namespace: str):
    rng = np.random.default_rng(0)
    prefixes, ids = rng.integers(4, size=(200, 2)), [f"i{i}" for i in range(200)]
    dedup = assign_dedup(prefixes, ids, 256)
    RedisDedupStore(redis.Redis.from_url(stack.redis_url), namespace).seed(seed_rows(prefixes, ids, dedup))
    new_prefixes, new_ids = rng.integers(4, size=(300, 2)), [f"n{i}" for i in range(300)]
    results: dict[int, np.ndarray] = {}

    def work(w: int) -> None:  # each worker has its own connection, as separate Flink instances would
        store = RedisDedupStore(redis.Redis.from_url(stack.redis_url), namespace)
        order = np.random.default_rng(w).permutation(300)
        got = DedupAllocator(store, 256).allocate(new_prefixes[order], [new_ids[i] for i in order])
        results[w] = got[np.argsort(order)]

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results[0], results[1])  # one index per item, whoever asked first
    codes = np.concatenate(
        [np.concatenate([prefixes, dedup[:, None]], 1), np.concatenate([new_prefixes, results[0][:, None]], 1)]
    )
    assert len(np.unique(codes, axis=0)) == len(codes)
    # the Lua rule gives the same indices as the pure rule (dense per prefix, seeded table first)
    for p in {tuple(r) for r in new_prefixes.tolist()}:
        mask_old = (prefixes == p).all(1)
        mask_new = (new_prefixes == p).all(1)
        assert sorted(results[0][mask_new].tolist()) == list(range(mask_old.sum(), mask_old.sum() + mask_new.sum()))


def test_full_prefix_raises(stack: Settings, namespace: str):
    store = RedisDedupStore(redis.Redis.from_url(stack.redis_url), namespace)
    allocator = DedupAllocator(store, 2)
    allocator.allocate(np.array([[1, 1], [1, 1]]), ["a", "b"])
    with pytest.raises(DedupOverflowError, match="dedup_size"):
        allocator.allocate(np.array([[1, 1]]), ["c"])


def _race_worker(worker: int, redis_url: str, namespace: str, ids: list[str], barrier, out) -> None:
    """One 'instance': its own connection, released with the other at the same moment, claims one by one."""
    store = RedisDedupStore(redis.Redis.from_url(redis_url), namespace)
    allocator = DedupAllocator(store, 1024)
    barrier.wait(30)
    got = {}
    for item_id in ids:
        got[item_id] = int(allocator.allocate(np.array([[3, 3]]), [item_id])[0])
    out.put((worker, got))


def test_two_processes_racing_on_one_prefix_get_unique_dense_indices(stack: Settings, namespace: str):
    client = redis.Redis.from_url(stack.redis_url)
    seeded = [f"old{i}" for i in range(10)]
    RedisDedupStore(client, namespace).seed(seed_rows(np.full((10, 2), 3), seeded, np.arange(10)))
    shared = [f"both{i}" for i in range(100)]  # both instances see these (a replay racing the first try)
    own = [[f"a{i}" for i in range(300)], [f"b{i}" for i in range(300)]]
    rng = np.random.default_rng(1)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(w, stack.redis_url, namespace,
                                                      rng.permutation(own[w] + shared).tolist(), barrier, out))
               for w in (0, 1)]
    for w in workers:
        w.start()
    results = dict(out.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    assert all(results[0][i] == results[1][i] for i in shared)  # one index per item, whoever claimed it
    merged = {**results[0], **results[1]}
    assert len(merged) == 700 and len(set(merged.values())) == 700  # no two items share an index
    assert sorted(merged.values()) == list(range(10, 710))  # dense after the seeded table, nothing lost
    interleaved = sum(1 for i in own[1] if results[1][i] < max(results[0][j] for j in own[0]))
    print(f"\n{interleaved} of 300 claims of process b landed below process a's highest: the claims interleaved")


def _job_instance(redis_url: str, artifact: str, items: list[dict], barrier, out) -> None:
    """What one parallel instance of the item_semantic_ids job runs (seed, then assign in batches)."""
    from jobs.item_semantic_ids_logic import redis_assigner

    client = redis.Redis.from_url(redis_url)
    _, assigner = redis_assigner(client, artifact)
    barrier.wait(60)
    got = {}
    for n in range(0, len(items), 8):
        got.update({a.item_id: a.sid for a in assigner.assign(items[n:n + 8])})
    out.put(got)


def test_two_job_instances_on_near_duplicates_get_unique_full_ids(stack: Settings, tmp_path):
    from contracts.redis_keys import dedup_namespace, index_key, item_key, parse_code
    from jobs.item_semantic_ids_logic import artifact_version, item_from_record
    from models.semantic_ids import build_semantic_ids

    config = {"quantizer": "rqkmeans", "codebook_sizes": [8, 8], "dedup_size": 256,
              "encoders": [{"type": "structured", "weight": 1.0, "hash_dim": 8}],
              "compare_baseline": False, "embedding_cache": "off", "progress": False}
    run = uuid.uuid4().hex[:8]
    base = {"domain": "movie", "description": "", "attributes": {"year": "1995"}, "updated_at": 0}
    catalog = [item_from_record({**base, "item_id": f"{run}-old{i}", "title": f"Film {i % 13}",
                                 "categories": [["Drama"], ["War", "Drama"], ["Comedy"]][i % 3]}) for i in range(90)]
    path = build_semantic_ids(catalog, config, dataset=run).save(tmp_path / "sid")
    version = artifact_version(path)
    twin = {**base, "title": "Film 1", "categories": ["War", "Drama"]}  # all share one prefix
    items = [item_from_record({**twin, "item_id": f"{run}-new{i}"}) for i in range(120)]
    client = redis.Redis.from_url(stack.redis_url)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    halves = [items[: 80], items[40:]]  # 40 items go to both (a replay after a failover)
    workers = [ctx.Process(target=_job_instance, args=(stack.redis_url, str(path), h, barrier, out)) for h in halves]
    try:
        for w in workers:
            w.start()
        results = [out.get(timeout=180) for _ in workers]
        for w in workers:
            w.join(30)
            assert w.exitcode == 0
        merged = {**results[0], **results[1]}
        assert all(results[0][i] == results[1][i] for i in set(results[0]) & set(results[1]))
        assert len(merged) == 120 and len({s[:-1] for s in merged.values()}) == 1
        table = {tuple(r) for r in np.load(path / "arrays.npz")["codes"].tolist()}
        assert len(set(merged.values())) == 120 and not set(merged.values()) & table
        stored = {i: parse_code(c) for i, c in zip(merged, client.hmget(item_key(version), list(merged)),
                                                   strict=True)}
        assert stored == merged  # the decode index agrees with what the instances returned
    finally:
        client.delete(index_key(version), item_key(version))
        for key in client.scan_iter(f"{dedup_namespace(version)}:*"):
            client.delete(key)
