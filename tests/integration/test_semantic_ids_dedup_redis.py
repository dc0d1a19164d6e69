"""RedisDedupStore on the stack's real Redis: two workers give new items collision-free, idempotent IDs."""

from __future__ import annotations

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
