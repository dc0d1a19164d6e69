"""The live catalog's rules (serving/live_items.py) over an in-memory stand-in for the three Redis commands it uses.

The real feed (written by the item job's RedisSidIndex) and a served model are in
tests/integration/test_serving_live_items.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from contracts.redis_keys import code_string, feed_entry, feed_key, item_key
from models.ugt.heads import PrefixTrie
from serving.live_items import LiveCatalog, resolve_version

SIZES = [2, 2, 4]


class FakeRedis:
    """GET / HMGET / XREAD over dicts (XREAD returns every entry after the given id, at most ``count``)."""

    def __init__(self) -> None:
        self.strings: dict[str, str] = {}
        self.hashes: dict[str, dict[str, str]] = {}
        self.streams: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self.fail = 0

    def get(self, key):
        return self.strings.get(key)

    def hmget(self, key, fields):
        return [self.hashes.get(key, {}).get(f) for f in fields]

    def xadd(self, key, fields):
        stream = self.streams.setdefault(key, [])
        stream.append((f"{1_700_000_000_000 + len(stream)}-0", dict(fields)))

    def xread(self, streams, count=None, block=None):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("Redis is down")
        (key, after), = streams.items()
        entries = [(i, f) for i, f in self.streams.get(key, []) if tuple(map(int, i.split("-"))) >
                   tuple(map(int, after.split("-")))]
        return [(key, entries[:count])] if entries else []


def trained_codes() -> np.ndarray:
    """Five trained items (indices 1..5) with codes (0,0,0) .. (0,1,0)."""
    codes = np.zeros((6, 3), np.int64)
    codes[1:] = [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    return codes


def catalog(slots: int = 3) -> LiveCatalog:
    return LiveCatalog(lambda: None, trained_codes=trained_codes(), codebook_sizes=SIZES,
                       genre_names=["Action", "Comedy", "Drama"], known=[f"t{i}" for i in range(1, 6)], slots=slots)


def announce(client: FakeRedis, item_id: str, code: tuple[int, ...], genres=(), year=None, version="v1") -> None:
    client.xadd(feed_key(version), feed_entry({"item_id": item_id, "genres": list(genres), "year": year},
                                              code_string(code)))


def test_accepted_items_come_in_order_with_metadata_and_a_trie_over_everything_served():
    client, live = FakeRedis(), catalog()
    announce(client, "n1", (1, 0, 0), ["Comedy", "Western"], 2015)
    announce(client, "n2", (1, 1, 3))
    assert live.poll(client, "v1") == 2
    new = live.take()
    assert new.item_ids == ["n1", "n2"]
    assert new.codes.tolist() == [[1, 0, 0], [1, 1, 3]]
    assert new.genres.tolist() == [[2], [0]]  # Comedy = 2 (0 = none); a genre the model never saw is dropped
    assert new.years.tolist() == [12, 0]  # 2010s bucket; unknown
    assert new.coded_at == [1_700_000_000.0, 1_700_000_000.001]
    # trie leaves: trained items 1..5, then the new ones as 6 and 7, the indices the engine gives them
    leaves = sorted(leaf for leaf in new.trie.leaf_item.tolist() if leaf)  # 0: spare rows for later items
    assert leaves == [1, 2, 3, 4, 5, 6, 7] and new.trie_edits == []
    assert live.take() is None  # drained
    assert live.poll(client, "v1") == 0  # nothing after the last entry read
    # a later item comes as an edit of the trie handed over before (the engine's, grown in place): the same paths
    # as a rebuild over everything served
    announce(client, "n3", (0, 1, 2))
    assert live.poll(client, "v1") == 1
    later = live.take()
    assert later.trie is None and len(later.trie_edits) == 1
    served = new.trie
    served.apply(later.trie_edits[0])
    rebuilt = PrefixTrie(np.concatenate([trained_codes()[1:], [[1, 0, 0], [1, 1, 3], [0, 1, 2]]]), SIZES)
    for level in range(len(SIZES)):
        assert int(served.allowed[level].sum()) == int(rebuilt.allowed[level].sum())
    assert sorted(leaf for leaf in served.leaf_item.tolist() if leaf) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_entries_that_cannot_be_served_are_counted_by_reason_and_nothing_else_changes():
    client, live = FakeRedis(), catalog(slots=2)
    announce(client, "t3", (1, 0, 1))  # a trained item
    announce(client, "n1", (0, 0, 2))  # the code of trained item 3
    announce(client, "n2", (2, 0, 0))  # level 0 has 2 codes
    announce(client, "n3", (1, 0))  # too short
    client.xadd(feed_key("v1"), {"code": "1-0-0"})  # no item id
    client.xadd(feed_key("v1"), {"item_id": "n4", "code": "x-y-z"})
    announce(client, "n5", (1, 0, 0))
    announce(client, "n5", (1, 0, 1))  # announced twice (a replayed job): the first code stands
    announce(client, "n6", (1, 1, 1))
    announce(client, "n7", (1, 1, 2))  # no room left
    assert live.poll(client, "v1") == 2
    assert live.take().item_ids == ["n5", "n6"]
    assert live.stats.rejected == {"known": 2, "duplicate_code": 1, "code_out_of_range": 2, "bad_entry": 2,
                                   "full": 1}
    assert live.stats.state == "full"


def test_the_version_must_hold_the_checkpoints_codes():
    client = FakeRedis()
    sample = {f"t{i}": code_string(c) for i, c in enumerate(trained_codes()[1:].tolist(), 1)}
    version, why = resolve_version(client, None, sample)
    assert version is None and "no semantic-ID version is active" in why
    client.strings["ugt:sid:active"] = "v2"
    client.hashes[item_key("v2")] = {k: "9-9-9" for k in sample}
    version, why = resolve_version(client, None, sample)
    assert version is None and "other codes in version v2" in why
    client.hashes[item_key("v1")] = dict(sample)
    assert resolve_version(client, "v1", sample)[0] == "v1"  # named: followed even though v2 is active
    client.hashes[item_key("v3")] = {"t1": sample["t1"]}  # one of five: not this model's artifact
    version, why = resolve_version(client, "v3", sample)
    assert version is None and "only 1 of 5" in why


def test_a_failing_feed_is_retried_and_loses_nothing():
    client, live = FakeRedis(), catalog()
    announce(client, "n1", (1, 0, 0))
    client.fail = 1
    with pytest.raises(ConnectionError):
        live.poll(client, "v1")
    assert live.take() is None
    assert live.poll(client, "v1") == 1  # the next read starts where the last good one ended
    assert live.take().item_ids == ["n1"]


def test_delay_histogram_counts_each_applied_item():
    client, live = FakeRedis(), catalog()
    announce(client, "n1", (1, 0, 0))
    live.poll(client, "v1")
    new = live.take()
    new.coded_at = [new.coded_at[0] * 0 + 1e12]  # announced "in the future": clamped to 0 s
    live.applied(new)
    assert live.stats.items == 1 and live.stats.delay_buckets[0] == 1 and live.stats.delay_sum == 0.0
    assert json.loads(feed_entry({"item_id": "x", "genres": ["A"], "year": 1999}, "1-2")["categories"]) == ["A"]


def test_a_backfill_flip_marks_the_catalog_superseded_until_the_version_is_back():
    client, live = FakeRedis(), catalog()
    live.stats.state = "following"
    client.strings["ugt:sid:active"] = "v1"
    live.check_active(client, "v1")
    assert live.stats.state == "following"
    client.strings["ugt:sid:active"] = "v2"  # `ugt semantic-ids backfill` flipped the pointer
    live.check_active(client, "v1")
    assert live.stats.state == "superseded"
    client.strings["ugt:sid:active"] = "v1"
    live.check_active(client, "v1")
    assert live.stats.state == "following"
