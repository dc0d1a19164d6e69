"""RedisDedupStore against the real Redis of the local stack (integration: the harness starts Redis)."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from infra.settings import get_settings
from models.semantic_ids.dedup import DedupAllocator, RedisDedupStore, assign_dedup, seed_rows

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_client():
    import redis

    client = redis.Redis.from_url(get_settings().redis_url)
    client.ping()  # fails the test when the stack's Redis is not up
    namespace = f"test:sid:{uuid.uuid4().hex[:8]}"
    yield client, namespace
    for key in client.scan_iter(f"{namespace}:*"):
        client.delete(key)


def test_two_workers_share_redis_without_collisions(redis_client):
    client, namespace = redis_client
    rng = np.random.default_rng(0)
    prefixes, ids = rng.integers(4, size=(200, 2)), [f"i{i}" for i in range(200)]
    dedup = assign_dedup(prefixes, ids, 256)
    RedisDedupStore(client, namespace).seed(seed_rows(prefixes, ids, dedup))
    new_prefixes, new_ids = rng.integers(4, size=(300, 2)), [f"n{i}" for i in range(300)]
    results = {}

    def work(w: int) -> None:
        import redis

        store = RedisDedupStore(redis.Redis.from_url(get_settings().redis_url), namespace)
        results[w] = DedupAllocator(store, 256).allocate(new_prefixes, new_ids)

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results[0], results[1])
    codes = np.concatenate(
        [np.concatenate([prefixes, dedup[:, None]], 1), np.concatenate([new_prefixes, results[0][:, None]], 1)]
    )
    assert len(np.unique(codes, axis=0)) == len(codes)
