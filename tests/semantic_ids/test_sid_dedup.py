"""Dedup level: unique IDs, deterministic offline, collision-free and idempotent for new items."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from models.semantic_ids.dedup import (
    DedupAllocator,
    DedupOverflowError,
    InMemoryDedupStore,
    assign_dedup,
    collision_stats,
    first_free,
    prefix_key,
    seed_rows,
)


def _catalog(n: int = 500, levels: int = 2, k: int = 6, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.integers(k, size=(n, levels)), [f"item{i}" for i in range(n)]


def test_every_item_gets_a_unique_id():
    prefixes, ids = _catalog()
    dedup = assign_dedup(prefixes, ids, capacity=64)
    full = np.concatenate([prefixes, dedup[:, None]], 1)
    assert len(np.unique(full, axis=0)) == len(ids)
    # indices are dense per prefix: 0..group size-1 (TIGER's scheme)
    stats = collision_stats(prefixes)
    assert dedup.max() == stats["max_items_per_prefix"] - 1
    assert stats["collision_rate"] == pytest.approx(1 - stats["unique_prefixes"] / len(ids))


def test_offline_assignment_is_deterministic_whatever_the_order():
    prefixes, ids = _catalog()
    first = dict(zip(ids, assign_dedup(prefixes, ids, 64), strict=True))
    order = list(range(len(ids)))
    random.Random(7).shuffle(order)
    shuffled = assign_dedup(prefixes[order], [ids[i] for i in order], 64)
    assert {ids[i]: d for i, d in zip(order, shuffled, strict=True)} == first


def test_overflow_and_bad_input_fail_clearly():
    prefixes = np.zeros((5, 2), np.int64)
    with pytest.raises(DedupOverflowError, match="dedup_size"):
        assign_dedup(prefixes, [str(i) for i in range(5)], capacity=4)
    with pytest.raises(ValueError, match="unique"):
        assign_dedup(prefixes[:2], ["a", "a"], capacity=4)
    assert first_free({0, 1, 3}, 8) == 2


def _seeded_store(prefixes: np.ndarray, ids: list[str], dedup: np.ndarray) -> InMemoryDedupStore:
    store = InMemoryDedupStore()
    store.seed(seed_rows(prefixes, ids, dedup))
    return store


def test_new_items_across_two_allocators_sharing_a_store_are_collision_free():
    prefixes, ids = _catalog(300)
    dedup = assign_dedup(prefixes, ids, 128)
    store = _seeded_store(prefixes, ids, dedup)  # what RedisDedupStore is for several workers
    workers = [DedupAllocator(store, 128), DedupAllocator(store, 128)]
    new_prefixes, _ = _catalog(400, seed=1)
    new_ids = [f"new{i}" for i in range(400)]
    results: dict[int, np.ndarray] = {}

    def work(w: int) -> None:  # both workers see every new item (at-least-once delivery, races)
        order = list(range(400))
        random.Random(w).shuffle(order)
        got = workers[w].allocate(new_prefixes[order], [new_ids[i] for i in order])
        results[w] = got[np.argsort(order)]

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results[0], results[1])  # idempotent: one index per item, whoever asked
    all_codes = np.concatenate(
        [np.concatenate([prefixes, dedup[:, None]], 1), np.concatenate([new_prefixes, results[0][:, None]], 1)]
    )
    assert len(np.unique(all_codes, axis=0)) == len(all_codes)


def test_new_items_partitioned_by_prefix_need_no_shared_store():
    """Flink key_by(prefix): each instance owns its prefixes; same catalog seed, separate stores."""
    prefixes, ids = _catalog(300)
    dedup = assign_dedup(prefixes, ids, 128)
    instances = [DedupAllocator(_seeded_store(prefixes, ids, dedup), 128) for _ in range(2)]
    new_prefixes, _ = _catalog(400, seed=2)
    new_ids = [f"new{i}" for i in range(400)]
    owner = [hash(prefix_key(p)) % 2 for p in new_prefixes]  # any partitioner works; Flink uses its own
    got = np.empty(400, np.int64)
    for w in (0, 1):
        rows = [i for i in range(400) if owner[i] == w]
        got[rows] = instances[w].allocate(new_prefixes[rows], [new_ids[i] for i in rows])
    all_codes = np.concatenate(
        [np.concatenate([prefixes, dedup[:, None]], 1), np.concatenate([new_prefixes, got[:, None]], 1)]
    )
    assert len(np.unique(all_codes, axis=0)) == len(all_codes)
    # a restarted instance (fresh state from the same seed) replaying its stream gives the same indices
    for w in (0, 1):
        rows = [i for i in range(400) if owner[i] == w]
        replay = DedupAllocator(_seeded_store(prefixes, ids, dedup), 128)
        np.testing.assert_array_equal(replay.allocate(new_prefixes[rows], [new_ids[i] for i in rows]), got[rows])


def test_online_rule_matches_offline_rule():
    """A fresh store fed the catalog in assign_dedup's order gives exactly the offline table."""
    prefixes, ids = _catalog(200)
    offline = assign_dedup(prefixes, ids, 64)
    order = sorted(range(200), key=lambda i: (tuple(prefixes[i]), ids[i]))
    online = DedupAllocator(InMemoryDedupStore(), 64).allocate(prefixes[order], [ids[i] for i in order])
    np.testing.assert_array_equal(online, offline[order])


def test_seed_conflicts_are_rejected():
    store = InMemoryDedupStore()
    store.seed([("1-2", "a", 0)])
    with pytest.raises(ValueError, match="already another item"):
        store.seed([("1-2", "b", 0)])
    with pytest.raises(DedupOverflowError):
        DedupAllocator(store, 1).allocate(np.array([[1, 2]]), ["c"])
