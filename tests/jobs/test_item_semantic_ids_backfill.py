"""The backfill's passes and coverage check without Kafka or Redis: a fake consumer over in-memory partitions.

tests/integration/test_item_sid_backfill.py runs the whole backfill (flip included) on the real stack.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from contracts.redis_keys import item_key
from jobs.item_semantic_ids_backfill import BackfillError, CatalogReader, ensure_covered
from jobs.item_semantic_ids_logic import Assigned
from streams.serde import AvroSerde

TOPIC = "items.test"
OLD, NEW = "vA", "vB"


class Message:
    def __init__(self, partition: int, offset: int, value: bytes):
        self._partition, self._offset, self._value = partition, offset, value

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value


class FakeConsumer:
    """The confluent_kafka.Consumer calls the backfill makes, over lists of values per partition."""

    def __init__(self, partitions: dict[int, list[bytes]]):
        self.partitions = partitions
        self.positions: dict[int, int] = {}

    def list_topics(self, topic: str, timeout: float) -> Any:
        meta = SimpleNamespace(error=None, partitions=dict.fromkeys(self.partitions))
        return SimpleNamespace(topics={TOPIC: meta})

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, len(self.partitions[tp.partition])

    def assign(self, tps: list[Any]) -> None:
        self.positions = {tp.partition: max(tp.offset, 0) for tp in tps}  # OFFSET_BEGINNING is negative

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        out = []
        for p, at in self.positions.items():
            values = self.partitions[p][at:at + num_messages]
            out.extend(Message(p, at + i, v) for i, v in enumerate(values))
            self.positions[p] = at + len(values)
        return out

    def unassign(self) -> None:
        self.positions = {}


class FakeRedis:
    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}

    def hmget(self, key: str, fields: list[str]) -> list[str | None]:
        return [self.hashes.get(key, {}).get(f) for f in fields]

    def hscan_iter(self, key: str, count: int = 10) -> Any:
        return iter(list(self.hashes.get(key, {}).items()))


class FakeAssigner:
    """Codes items under NEW in the fake Redis, as ItemSidAssigner does in the real index; remembers the batches."""

    def __init__(self, client: FakeRedis):
        self.client, self.batches = client, []

    def assign(self, items: list[dict[str, Any]]) -> list[Assigned]:
        self.batches.append([it["item_id"] for it in items])
        coded = self.client.hashes.setdefault(item_key(NEW), {})
        out = [Assigned(it["item_id"], (1, 2, 0), it["item_id"] not in coded) for it in items]
        coded.update((it["item_id"], "1-2-0") for it in items)
        return out


def item_event(serde: AvroSerde, item_id: str, title: str = "A Film") -> bytes:
    return serde.encode(f"{TOPIC}-value", "item_event", {
        "item_id": item_id, "domain": "movie", "title": title, "description": "", "categories": ["Drama"],
        "attributes": {"year": "1999"}, "updated_at": 1_700_000_000_000})


def reader(serde: AvroSerde, partitions: dict[int, list[bytes]], batch_size: int = 2):
    client = FakeRedis()
    assigner = FakeAssigner(client)
    return client, assigner, CatalogReader(FakeConsumer(partitions), serde, assigner, TOPIC, batch_size, False)


def test_a_pass_reads_its_range_in_batches_and_skips_what_the_job_dead_lettered(serde: AvroSerde):
    partitions = {0: [item_event(serde, "a"), b"not avro", item_event(serde, "b")],
                  1: [item_event(serde, "c"), item_event(serde, "a", title="A Film, recut")]}
    _, assigner, catalog = reader(serde, partitions)
    end = catalog.end_offsets()
    assert end == {0: 3, 1: 2}
    assert catalog.read(None, end, "pass 1") == 5
    assert sorted(sum(assigner.batches, [])) == ["a", "a", "b", "c"]
    assert all(len(b) <= 2 for b in assigner.batches)
    assert (catalog.records, catalog.skipped, catalog.new_ids) == (5, 1, 3)
    assert catalog.latest["a"]["title"] == "A Film, recut" and set(catalog.latest) == {"a", "b", "c"}
    partitions[0].append(item_event(serde, "d"))  # published after pass 1's end offsets
    assert catalog.read(end, catalog.end_offsets(), "catch-up") == 1
    assert assigner.batches[-1] == ["d"] and (catalog.records, catalog.new_ids) == (6, 4)


def test_coverage_reads_what_the_job_indexed_after_pass_1_then_refuses_what_is_nowhere(serde: AvroSerde):
    partitions = {0: [item_event(serde, "a")]}
    client, assigner, catalog = reader(serde, partitions)
    end = catalog.end_offsets()
    catalog.read(None, end, "pass 1")
    assert ensure_covered(client, catalog, None, NEW, end) == end  # nothing active yet: nothing to cover
    assert ensure_covered(client, catalog, NEW, NEW, end) == end
    # the running job coded "b" under OLD after pass 1 ended: it is in the topic, so pass 1b picks it up
    client.hashes[item_key(OLD)] = {"a": "0-0-0", "b": "0-1-0"}
    partitions[0].append(item_event(serde, "b"))
    assert ensure_covered(client, catalog, OLD, NEW, end) == {0: 2}
    assert assigner.batches[-1] == ["b"]
    # "z" has an OLD code but was never published: flipping would lose it
    client.hashes[item_key(OLD)]["z"] = "0-2-0"
    with pytest.raises(BackfillError, match=r"1 items of the active version vA have no code under vB .*'z'"):
        ensure_covered(client, catalog, OLD, NEW, {0: 2})
    assert ensure_covered(client, catalog, OLD, NEW, {0: 2}, allow_missing=True) == {0: 2}
