"""Backfill a new semantic-ID artifact version without downtime (`ugt semantic-ids backfill --artifact NEW`).

Why the catalog topic is the source: items.catalog is compacted (streams.topics), so reading it from the earliest
offset gives the latest event of every item ever published, with all its features (title, description, genres,
year); Feast item_metadata holds only what the job derived, not what the encoder needs.

Steps (readers keep using the old version until step 4; the running job follows the flip batch by batch):
  1. load NEW, seed its dedup store and decode index with the artifact's own table, register its path;
  2. pass 1: items.catalog from earliest to the end offsets E1 -> NEW's index (stable, idempotent IDs);
  3. check coverage: every item of the old active version's index must have a NEW code (else stop, no flip);
     items the job indexed after E1 are read first (they are in the topic before the check: E1 -> now);
  4. flip ``ugt:sid:active`` (one SET), wait `grace_s` so a job batch that read the old pointer finishes;
  5. pass 2: E1 to the end offsets E2 taken after the flip -> NEW (items the job wrote under the old version
     before it saw the flip were in the topic before the flip, so E2 covers them);
  6. Feast item_metadata rows with NEW's IDs for every catalog item (after the flip: the rows match the pointer).
The old version's keys stay (a reader mid-request can finish); delete them when nothing reads them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contracts.redis_keys import ACTIVE_KEY, activate, active_version, item_key, parse_code, register_artifact
from jobs.dead_letters import DeadLetterError
from jobs.item_semantic_ids_logic import ItemSidAssigner, decode_item_event, feature_row, redis_assigner

log = logging.getLogger("ugt.jobs.item_semantic_ids_job.backfill")


class BackfillError(RuntimeError):
    """The new version would not cover the catalog (nothing was flipped), or a part of the stack is missing."""


@dataclass
class BackfillReport:
    version: str
    previous: str | None
    flipped: bool
    catalog_records: int  # pass 1 + pass 2 records read (all events, not distinct items)
    catch_up_records: int  # pass 2 alone
    skipped_records: int  # undecodable (the job dead-lettered them already)
    items: int  # distinct catalog items now coded under the new version
    new_ids: int  # of those, items that got a code in this run (not from the artifact table or an earlier run)
    feast_rows: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def end_offsets(consumer: Any, topic: str) -> dict[int, int]:
    """High watermark of every partition of `topic` (where a read 'to the end, now' stops)."""
    from confluent_kafka import TopicPartition

    metadata = consumer.list_topics(topic, timeout=15)
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        raise BackfillError(f"topic {topic!r} does not exist on the cluster; nothing to backfill from")
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1]
            for p in metadata.topics[topic].partitions}


def read_range(consumer: Any, topic: str, start: dict[int, int] | None, end: dict[int, int],
               idle_timeout_s: float = 30.0) -> Iterator[bytes | None]:
    """Values of `topic` from `start` (None: earliest) up to `end` (exclusive) on every partition."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    todo = {p: e for p, e in end.items() if e > (start or {}).get(p, 0)}
    if not todo:
        return
    consumer.assign([TopicPartition(topic, p, (start or {}).get(p, OFFSET_BEGINNING)) for p in todo])
    last = time.monotonic()
    while todo:
        msgs = consumer.consume(num_messages=1000, timeout=0.5)
        if not msgs and time.monotonic() - last > idle_timeout_s:
            raise BackfillError(f"{topic}: no records for {idle_timeout_s:.0f} s before the end offsets {todo}")
        for msg in msgs:
            if msg.error():
                continue
            last = time.monotonic()
            p = msg.partition()
            if p not in todo or msg.offset() >= todo[p]:
                continue
            yield msg.value()
            if msg.offset() + 1 >= todo[p]:
                del todo[p]
    consumer.unassign()


class CatalogReader:
    """Reads ranges of the catalog topic into the new version's index, batch by batch (the backfill's passes).

    Keeps what the report needs across passes: the latest event of every item (for the Feast rows) and the counts.
    """

    def __init__(self, consumer: Any, serde: Any, assigner: ItemSidAssigner, topic: str, batch_size: int = 1000,
                 progress: bool = True):
        self.consumer, self.serde, self.assigner, self.topic = consumer, serde, assigner, topic
        self.batch_size, self.progress = batch_size, progress
        self.latest: dict[str, dict[str, Any]] = {}
        self.records = 0  # all passes, all events (not distinct items)
        self.skipped = 0  # undecodable (the job dead-lettered them already)
        self.new_ids = 0  # items that got a code here (not from the artifact table or an earlier run)

    def end_offsets(self) -> dict[int, int]:
        return end_offsets(self.consumer, self.topic)

    def read(self, start: dict[int, int] | None, end: dict[int, int], label: str) -> int:
        """Assign every item event from `start` (None: earliest) to `end`; returns the records read."""
        from tqdm import tqdm

        total = sum(e - (start or {}).get(p, 0) for p, e in end.items())
        batch: list[dict[str, Any]] = []
        read, t0 = 0, time.monotonic()
        with tqdm(total=total, desc=label, unit="rec", disable=not self.progress) as bar:
            for data in read_range(self.consumer, self.topic, start, end):
                read += 1
                bar.update(1)
                try:
                    item = decode_item_event(self.serde, data)
                except DeadLetterError:
                    self.skipped += 1
                    continue
                self.latest[item["item_id"]] = item
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self.new_ids += _assign(self.assigner, batch)
                    batch = []
            self.new_ids += _assign(self.assigner, batch)
        self.records += read
        log.info("%s: %d records in %.2f s", label, read, time.monotonic() - t0)
        return read


def ensure_covered(client: Any, catalog: CatalogReader, previous: str | None, version: str,
                   pass1_end: dict[int, int], allow_missing: bool = False) -> dict[int, int]:
    """Step 3: every item of the `previous` version's index has a code under `version`, else BackfillError.

    Items the running job indexed after pass 1's end offsets are in the topic before this check, so they are
    read first (pass 1b); returns the offsets pass 1 now reaches (where the catch-up pass starts).
    """
    if previous is None or previous == version:
        return pass1_end
    missing = uncovered(client, previous, version)
    if missing:  # the job indexed them after pass 1's end, so they are in the topic before now: read up to now
        now = catalog.end_offsets()
        catalog.read(pass1_end, now, f"backfill {version} pass 1b")
        pass1_end = now
        have = client.hmget(item_key(version), sorted(missing))
        missing = {i for i, c in zip(sorted(missing), have, strict=True) if c is None}
    if missing and not allow_missing:
        raise BackfillError(
            f"{len(missing)} items of the active version {previous} have no code under {version} (neither in "
            f"the new artifact nor in {catalog.topic}), e.g. {sorted(missing)[:5]}; not flipping. Publish them to "
            "the catalog, build the artifact over them, or pass --allow-missing")
    return pass1_end


def backfill(settings: Any, artifact: str | Path, topic: str | None = None, active_key: str = ACTIVE_KEY,
             batch_size: int = 1000, grace_s: float = 2.0, allow_missing: bool = False, feast: bool = True,
             progress: bool = True, after_pass1: Callable[[], None] | None = None) -> BackfillReport:
    """Re-encode the catalog into the version of `artifact`, then flip `active_key` to it (see module doc).

    `after_pass1` is a hook for tests (publish while the backfill is between its passes).
    """
    from confluent_kafka import Consumer

    from infra.redis_client import redis_client
    from streams.serde import AvroSerde, SchemaRegistryClient

    started = time.monotonic()
    topic = topic or settings.topics.items
    client = redis_client(settings)
    version, assigner = redis_assigner(client, artifact)  # step 1
    register_artifact(client, version, artifact)
    previous = active_version(client, active_key)
    log.info("backfill: version %s (active now: %s) from %s", version, previous, topic)
    serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"ugt-backfill-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    catalog = CatalogReader(consumer, serde, assigner, topic, batch_size, progress)
    try:
        e1 = catalog.end_offsets()
        catalog.read(None, e1, f"backfill {version} pass 1")  # step 2
        if after_pass1 is not None:
            after_pass1()
        e1 = ensure_covered(client, catalog, previous, version, e1, allow_missing)  # step 3
        flipped = previous != version
        if flipped:  # step 4
            activate(client, version, active_key)
            log.info("backfill: %s now points at %s (was %s)", active_key, version, previous)
            time.sleep(grace_s)
        caught_up = catalog.read(e1, catalog.end_offsets(), f"backfill {version} catch-up")  # step 5
    finally:
        consumer.close()
    rows = 0
    if feast and catalog.latest:  # step 6
        rows = write_feast_rows(settings, assigner, list(catalog.latest.values()), batch_size)
    report = BackfillReport(version, previous, flipped, catalog.records, caught_up, catalog.skipped,
                            len(catalog.latest), catalog.new_ids, rows, round(time.monotonic() - started, 3))
    client.close()
    return report


def _assign(assigner: ItemSidAssigner, batch: list[dict[str, Any]]) -> int:
    """Assign a batch; returns how many items got a new code."""
    if not batch:
        return 0
    return sum(1 for a in assigner.assign(batch) if a.new)


def uncovered(client: Any, old: str, new: str, chunk: int = 5000) -> set[str]:
    """Items with a code under `old` but none under `new`."""
    missing: set[str] = set()
    ids: list[str] = []

    def check() -> None:
        codes = client.hmget(item_key(new), ids)
        missing.update(i for i, c in zip(ids, codes, strict=True) if c is None)
        ids.clear()

    for raw in client.hscan_iter(item_key(old), count=chunk):
        ids.append(raw[0].decode() if isinstance(raw[0], bytes) else raw[0])
        if len(ids) >= chunk:
            check()
    if ids:
        check()
    return missing


def write_feast_rows(settings: Any, assigner: ItemSidAssigner, items: list[dict[str, Any]], chunk: int) -> int:
    """Feast item_metadata rows with the new IDs (semantic_ids is one field, so it follows the active version)."""
    from infra.feast_store import open_feature_store
    from jobs.item_semantic_ids_logic import feast_item_writer

    write = feast_item_writer(open_feature_store(settings))
    for n in range(0, len(items), chunk):
        part = items[n:n + chunk]
        codes = assigner.index.lookup([it["item_id"] for it in part])
        write([feature_row(it, parse_code(codes[it["item_id"]])) for it in part])
    return len(items)
