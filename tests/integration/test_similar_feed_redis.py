"""The similar-items index follows the item job's new-item feed on a real Redis (a private redis-server of this
test): an item announced the way the job announces it (contracts.redis_keys.feed_entry, XADD) is found by
GET /similar's index within seconds, placed by content, and a replayed announcement is not added twice."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from contracts.redis_keys import code_string, feed_entry, feed_key, item_key
from models.similar import ItemTables, SimilarIndex
from serving.similar import SimilarItems
from tests.private_redis import private_redis

pytestmark = pytest.mark.integration
VERSION = "itest-similar-v1"
SIZES = [4, 8]


@pytest.fixture()
def own_redis(tmp_path) -> Iterator[redis.Redis]:
    with private_redis(tmp_path) as client:
        yield client


def catalog(folder: Path) -> tuple[ItemTables, np.ndarray]:
    """300 trained items (second-level codes 0..3 only) saved as an index; their unshifted codes."""
    rng = np.random.default_rng(3)
    n, dim = 300, 8
    raw = np.stack([rng.integers(0, 4, n + 1), rng.integers(0, 4, n + 1)], axis=1)
    codes = raw + np.array([0, 4]) + 1
    codes[0] = 0
    tables = ItemTables(item_ids=[f"i{i}" for i in range(1, n + 1)], collab=rng.normal(size=(n + 1, dim)),
                        genre_table=rng.normal(size=(4, dim)), genres=rng.integers(0, 4, (n + 1, 1)),
                        year_table=rng.normal(size=(5, dim)), years=rng.integers(1, 5, n + 1),
                        code_table=rng.normal(size=(13, dim)), codes=codes, codebook_sizes=SIZES,
                        genre_names=["Action", "Comedy", "Drama"], sid_version=VERSION)
    SimilarIndex.build(tables).save(folder)
    return tables, raw


def test_new_items_from_the_feed_join_the_index(own_redis, tmp_path):
    tables, raw = catalog(tmp_path / "idx")
    # the job's decode index of the trained items: what the follower checks before trusting the feed
    own_redis.hset(item_key(VERSION), mapping={f"i{i}": code_string(raw[i]) for i in range(1, 301)})
    port = own_redis.connection_pool.connection_kwargs["port"]
    similar = SimilarItems.load(tmp_path / "idx", live_items=10,
                                redis_factory=lambda: redis.Redis(port=port, socket_timeout=5))
    similar.start_background()
    try:
        code = (int(raw[7, 0]), 6)  # a second-level code no trained item has: dropped, the rest places it
        own_redis.xadd(feed_key(VERSION), feed_entry({"item_id": "fresh", "genres": ["Comedy"], "year": 2001},
                                                     code_string(code)))
        deadline = time.monotonic() + 10
        added = 0
        while not added and time.monotonic() < deadline:
            added = similar.refresh()
            time.sleep(0.02)
        assert added == 1 and similar.size == 301
        assert similar.live is not None and similar.live.stats.state == "following"
        near = similar.neighbours("fresh", 5)
        assert len(near) == 5 and "fresh" not in [i.item_id for i in near]
        # a replayed announcement (a restored job) is not a second item
        own_redis.xadd(feed_key(VERSION), feed_entry({"item_id": "fresh", "genres": [], "year": None},
                                                     code_string(code)))
        time.sleep(1.5)
        assert similar.refresh() == 0 and similar.size == 301
        assert similar.live.stats.rejected.get("known") == 1
    finally:
        assert similar.live is not None
        similar.live.stop()
