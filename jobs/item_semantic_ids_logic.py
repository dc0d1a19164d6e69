"""The item_semantic_ids job's logic, without Flink: item event bytes -> semantic ID -> Feast row + decode index.

Per record the decode step (:func:`decode_item_event`) turns items.catalog bytes into a canonical item, or a
:class:`~jobs.tokenize_logic.DeadLetterError` (BAD_MAGIC / UNKNOWN_SCHEMA / DECODE_ERROR / OVERSIZED from
streams.serde, MISSING_FIELD / WRONG_TYPE / BAD_VALUE for records that are not usable item events (BAD_VALUE:
an empty item_id or one over ``contracts.limits.MAX_ID_CHARS``),
PROCESSING_ERROR for anything else). :class:`ItemSidAssigner` then gives a batch of items their full
semantic ID (the artifact's L levels + a dedup index) and writes:

* the decode index the generator reads (one pair of Redis hashes per artifact version)::

      HSET ugt:sid:index:<version> "l1-l2-...-dedup" <item_id>    # code -> item
      HSET ugt:sid:item:<version>  <item_id> "l1-l2-...-dedup"    # item -> code

* the new-item feed live generators follow (serving/live_items.py), written with the hashes by one Lua script
  (atomic; the three keys share the version's hash tag, so a Redis Cluster runs it too)::

      XADD ugt:sid:feed:<version> MAXLEN ~ 1000000 * item_id <id> code "l1-..-dedup" categories <json> year <y>

  Only items this job gives a code go there (not the artifact's own table, which a model was trained on).
* the Feast `item_metadata` row (title, domain, categories, year, semantic_ids = the full ID).

Which version: ``ugt:sid:active`` (:data:`ACTIVE_KEY`, read with :func:`active_version`) names the version readers
use; the job sets it at start if none is, and assigns each batch under the version active at that moment
(:class:`ActiveVersionAssigner`), so a backfill (jobs.item_semantic_ids_backfill) reaches it without a restart.

IDs are stable: an item that already has a code under this version (in the index, or in the artifact's own
table) keeps it, so a replayed or updated item event gets the same ID back. New items get their dedup index
from a shared :class:`~models.semantic_ids.dedup.RedisDedupStore`, so parallel instances never collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from contracts.limits import MAX_ID_CHARS
from contracts.redis_keys import (
    ACTIVE_KEY,
    ARTIFACTS_KEY,
    FEED_MAXLEN,
    activate_if_none,
    active_version,
    artifact_path_of,
    code_string,
    dedup_namespace,
    feed_entry,
    feed_key,
    index_key,
    item_key,
    parse_code,
    register_artifact,
)
from jobs.dead_letters import DeadLetterError, dead_letter_key, dead_letter_record
from models.semantic_ids.artifact import artifact_version  # noqa: F401 - re-exported: jobs name versions by it
from models.semantic_ids.dedup import DedupAllocator, DedupOverflowError
from models.semantic_ids.items import ItemError, canonical_item
from streams.serde import AvroSerde, RegistryError, SerdeError

log = logging.getLogger("ugt.jobs.item_semantic_ids_job")

JOB_NAME = "item_semantic_ids"
FEATURE_VIEW = "item_metadata"
PUSH_SOURCE = "item_metadata_push"
REQUIRED_STRINGS = ("item_id", "domain", "title")


def item_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """An ItemEvent record -> canonical item dict (plus domain and updated_at); DeadLetterError if unusable."""
    for name in REQUIRED_STRINGS:
        if name not in record or record[name] is None:
            raise DeadLetterError("MISSING_FIELD", f"item event lacks {name!r}")
        if not isinstance(record[name], str):
            raise DeadLetterError("WRONG_TYPE", f"{name} must be a string, got {type(record[name]).__name__}")
    if not record["item_id"].strip():
        raise DeadLetterError("BAD_VALUE", "item_id is empty")
    if len(record["item_id"]) > MAX_ID_CHARS:  # /recommend could never name it (exclude, context, answers)
        raise DeadLetterError("BAD_VALUE", f"item_id is {len(record['item_id'])} characters long, over the "
                                           f"{MAX_ID_CHARS} that /recommend accepts: {record['item_id'][:40]!r}...")
    categories = record.get("categories") or []
    if not isinstance(categories, list):
        raise DeadLetterError("WRONG_TYPE", f"categories must be a list, got {type(categories).__name__}")
    try:
        item = canonical_item(record)
    except ItemError as exc:
        raise DeadLetterError("BAD_VALUE", str(exc)) from exc
    item["domain"] = record["domain"]
    item["updated_at"] = _epoch_ms(record.get("updated_at"))
    return item


def _epoch_ms(value: Any) -> int:
    """updated_at as epoch ms: fastavro decodes timestamp-millis to an aware datetime, producers pass ints."""
    if value is None:
        return 0
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, int):
        return value
    raise DeadLetterError("WRONG_TYPE", f"updated_at must be epoch ms, got {type(value).__name__}")


def decode_item_event(serde: AvroSerde, data: bytes | None) -> dict[str, Any]:
    """items.catalog bytes -> canonical item dict, or DeadLetterError with the reason code."""
    try:
        return item_from_record(serde.decode(data).record)
    except SerdeError as exc:
        raise DeadLetterError(exc.reason_code, exc.reason) from exc
    except (DeadLetterError, RegistryError):
        raise
    except Exception as exc:  # the record broke the decoder in a way nobody named yet
        raise DeadLetterError("PROCESSING_ERROR", f"{exc.__class__.__name__}: {exc}") from exc


def feature_row(item: Mapping[str, Any], sid: Sequence[int]) -> dict[str, Any]:
    """The Feast item_metadata row of one item (semantic_ids = the full ID, dedup level last)."""
    return {
        "item_id": item["item_id"],
        "title": item["title"],
        "domain": item.get("domain", ""),
        "categories": list(item.get("genres") or []),
        "year": item.get("year"),
        "semantic_ids": [int(c) for c in sid],
    }


class SidIndex:
    """The decode index of one artifact version: code <-> item id, in Redis (or a dict in tests)."""

    def lookup(self, item_ids: Sequence[str]) -> dict[str, str]:
        """item_id -> code string, for the ids that have one."""
        raise NotImplementedError

    def write(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Store (item_id, code string) pairs both ways."""
        raise NotImplementedError

    def write_new(self, entries: Sequence[Mapping[str, str]]) -> None:
        """Store the codes of newly coded items (:func:`feed_entry` dicts) and announce them on the feed, atomically."""
        raise NotImplementedError


class DictSidIndex(SidIndex):
    """In-process index (unit tests, one-off scripts)."""

    def __init__(self) -> None:
        self.code_to_item: dict[str, str] = {}
        self.item_to_code: dict[str, str] = {}
        self.feed: list[dict[str, str]] = []

    def lookup(self, item_ids: Sequence[str]) -> dict[str, str]:
        return {i: self.item_to_code[i] for i in item_ids if i in self.item_to_code}

    def write(self, pairs: Iterable[tuple[str, str]]) -> None:
        for item_id, code in pairs:
            self.code_to_item[code] = item_id
            self.item_to_code[item_id] = code

    def write_new(self, entries: Sequence[Mapping[str, str]]) -> None:
        self.write((e["item_id"], e["code"]) for e in entries)
        self.feed.extend(dict(e) for e in entries)


# KEYS = index, item, feed of one version (one hash slot). ARGV[1] = feed MAXLEN (approximate), ARGV[2] = entries,
# then per entry: code, item_id, the number of feed fields, then the feed's field/value pairs.
WRITE_NEW_SCRIPT = """
local a = 3
for _ = 1, tonumber(ARGV[2]) do
  local code, item, m = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  redis.call('HSET', KEYS[1], code, item)
  redis.call('HSET', KEYS[2], item, code)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, a + 3, a + 2 + m))
  a = a + 3 + m
end
return 0
"""


class RedisSidIndex(SidIndex):
    """The two hashes :func:`index_key` / :func:`item_key` of one version, written in one pipeline per batch."""

    def __init__(self, client: Any, version: str, chunk: int = 5000):
        self.redis, self.version, self.chunk = client, version, chunk

    def lookup(self, item_ids: Sequence[str]) -> dict[str, str]:
        if not item_ids:
            return {}
        codes = self.redis.hmget(item_key(self.version), list(item_ids))
        return {i: (c.decode() if isinstance(c, bytes) else c) for i, c in zip(item_ids, codes, strict=True)
                if c is not None}

    def write(self, pairs: Iterable[tuple[str, str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for n, (item_id, code) in enumerate(pairs, 1):
            pipe.hset(index_key(self.version), code, item_id)
            pipe.hset(item_key(self.version), item_id, code)
            if n % self.chunk == 0:
                pipe.execute()
        pipe.execute()

    def write_new(self, entries: Sequence[Mapping[str, str]]) -> None:
        # one script (atomic, like MULTI, and a Redis Cluster runs it: the three keys share the version's hash
        # tag): a reader never sees a feed entry whose code is not in the hashes, nor the reverse after a crash
        if not entries:
            return
        args: list[Any] = [FEED_MAXLEN, len(entries)]
        for e in entries:
            fields = [x for pair in dict(e).items() for x in pair]
            args += [e["code"], e["item_id"], len(fields), *fields]
        self._write_new(keys=[index_key(self.version), item_key(self.version), feed_key(self.version)], args=args)

    @property
    def _write_new(self) -> Callable[..., Any]:
        script = getattr(self, "_write_new_script", None)
        if script is None:
            script = self._write_new_script = self.redis.register_script(WRITE_NEW_SCRIPT)
        return script


@dataclass(frozen=True)
class Assigned:
    """One item's result: its full semantic ID and whether this batch gave it (False: it already had one)."""

    item_id: str
    sid: tuple[int, ...]
    new: bool


class ItemSidAssigner:
    """Batch of canonical items -> full semantic IDs, written to the index and (through `write_rows`) to Feast.

    `artifact` is a loaded SemanticIdArtifact (loaded once per worker), `allocator` a DedupAllocator over
    the shared dedup store (seeded with the artifact's table), `index` the decode index of this version.
    """

    def __init__(self, artifact: Any, allocator: DedupAllocator, index: SidIndex,
                 write_rows: Callable[[list[dict[str, Any]]], None] | None = None):
        self.artifact, self.allocator, self.index, self.write_rows = artifact, allocator, index, write_rows
        self.items_seen = 0
        self.ids_given = 0

    def seed_index(self) -> int:
        """Write the artifact's own table into the index (idempotent); returns the number of items."""
        self.index.write((i, code_string(c)) for i, c in zip(self.artifact.item_ids, self.artifact.codes.tolist(),
                                                              strict=True))
        return len(self.artifact.item_ids)

    def assign(self, items: Sequence[Mapping[str, Any]]) -> list[Assigned]:
        """Full IDs for a batch (the last event of an item within the batch wins for its Feast row).

        Raises DedupOverflowError when a prefix is full (the caller dead-letters those items one by one).
        """
        latest: dict[str, Mapping[str, Any]] = {}
        for item in items:
            latest[item["item_id"]] = item
        ids = list(latest)
        known = self.index.lookup(ids)
        todo = [latest[i] for i in ids if i not in known]
        fresh = dict(zip((it["item_id"] for it in todo), self.artifact.encode(todo, allocator=self.allocator),
                         strict=True)) if todo else {}
        if fresh:
            self.index.write_new([feed_entry(latest[i], code_string(sid)) for i, sid in fresh.items()])
        out = [Assigned(i, parse_code(known[i]), False) if i in known else Assigned(i, tuple(fresh[i]), True)
               for i in ids]
        if self.write_rows is not None and out:
            self.write_rows([feature_row(latest[a.item_id], a.sid) for a in out])
        self.items_seen += len(items)
        self.ids_given += len(fresh)
        return out


def redis_assigner(client: Any, path: str | Path,
                   write_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> tuple[str, ItemSidAssigner]:
    """(version, assigner) of the artifact at `path` over Redis: dedup store and decode index seeded (idempotent).

    Seeding comes before any claim, so a new item can never take an index an artifact item holds.
    """
    from models.semantic_ids.artifact import SemanticIdArtifact
    from models.semantic_ids.dedup import RedisDedupStore, seed_rows

    artifact = SemanticIdArtifact.load(path)
    version = artifact_version(path)
    store = RedisDedupStore(client, dedup_namespace(version))
    store.seed(seed_rows(artifact.codes[:, :-1], artifact.item_ids, artifact.codes[:, -1]))  # hsetnx
    assigner = ItemSidAssigner(artifact, DedupAllocator(store, artifact.dedup_size), RedisSidIndex(client, version),
                               write_rows)
    assigner.seed_index()
    return version, assigner


class ActiveVersionAssigner:
    """Assigns each batch under the version active *at assign time*, so a backfill's flip reaches a running job.

    Why it is enough for a backfill without gaps: a batch is read from Kafka before `assign` runs, so every item
    written under the old version was in the topic before the flip; the backfill re-reads the topic up to its
    end offsets taken after the flip, which covers them. `make(version)` builds a version's assigner (loads its
    artifact); when it fails the job stays on the version it has and says so (once per version).
    """

    def __init__(self, version: str, assigner: ItemSidAssigner, current: Callable[[], str | None],
                 make: Callable[[str], ItemSidAssigner]):
        self.version, self.assigner, self.current, self.make = version, assigner, current, make
        self.failed: set[str] = set()
        self.switches = 0

    def assign(self, items: Sequence[Mapping[str, Any]]) -> list[Assigned]:
        wanted = self.current() or self.version
        if wanted != self.version and wanted not in self.failed:
            try:
                assigner = self.make(wanted)
            except Exception as exc:  # noqa: BLE001 - any failure: keep serving the version we have
                self.failed.add(wanted)
                log.error("semantic-ID version %s is active but cannot be loaded here (%s); staying on %s",
                          wanted, exc, self.version)
            else:
                log.info("semantic-ID version %s -> %s (active pointer flipped)", self.version, wanted)
                self.version, self.assigner = wanted, assigner
                self.switches += 1
        return self.assigner.assign(items)


def follow_active(client: Any, path: str | Path,
                  write_rows: Callable[[list[dict[str, Any]]], None] | None = None,
                  key: str = ACTIVE_KEY) -> ActiveVersionAssigner:
    """The job's assigner: starts on `path` (registering it, activating it if nothing is active), then follows
    ``ugt:sid:active`` (or `key`: tests use their own) to any version a backfill registered
    (see :class:`ActiveVersionAssigner`)."""
    version, assigner = redis_assigner(client, path, write_rows)
    register_artifact(client, version, path)
    if activate_if_none(client, version, key):
        log.info("semantic-ID version %s is now active (none was)", version)

    def make(wanted: str) -> ItemSidAssigner:
        folder = artifact_path_of(client, wanted)
        if folder is None:
            raise ValueError(f"no artifact registered for it in {ARTIFACTS_KEY}")
        got, built = redis_assigner(client, folder, write_rows)
        if got != wanted:
            raise ValueError(f"{folder} now holds version {got}, not {wanted}")
        return built

    return ActiveVersionAssigner(version, assigner, lambda: active_version(client, key), make)


class ItemBatcher:
    """Buffers decoded items (with where they came from) until `max_items` or `max_delay_s`; then assigns.

    `flush()` returns dead letters (as (key, record) pairs) for items whose prefix ran out of dedup indices.
    """

    def __init__(self, assigner: ItemSidAssigner | ActiveVersionAssigner, max_items: int = 256, max_delay_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        if max_items < 1 or max_delay_s < 0:
            raise ValueError(f"max_items must be >= 1 and max_delay_s >= 0, got {max_items}, {max_delay_s}")
        self.assigner, self.max_items, self.max_delay_s = assigner, max_items, max_delay_s
        self.clock, self.wall = clock, wall
        self.pending: list[tuple[dict[str, Any], tuple[bytes, str, int, int]]] = []
        self.first_at: float | None = None

    def add(self, item: dict[str, Any], origin: tuple[bytes, str, int, int]) -> None:
        """Queue one item; `origin` is (original bytes, topic, partition, offset) for a possible dead letter."""
        if self.first_at is None:
            self.first_at = self.clock()
        self.pending.append((item, origin))

    def due(self) -> bool:
        if self.first_at is None:
            return False
        return len(self.pending) >= self.max_items or self.clock() - self.first_at >= self.max_delay_s

    def flush(self) -> tuple[list[Assigned], list[tuple[bytes, dict[str, Any]]]]:
        """Assign what is queued: (assigned, dead letters as (key, DeadLetter record))."""
        pending, self.pending, self.first_at = self.pending, [], None
        if not pending:
            return [], []
        try:
            return self.assigner.assign([item for item, _ in pending]), []
        except DedupOverflowError:
            pass
        assigned, dead = [], []
        for item, (data, topic, partition, offset) in pending:  # one by one: only the full prefixes fail
            try:
                assigned.extend(self.assigner.assign([item]))
            except DedupOverflowError as exc:
                log.error("item %s: %s", item["item_id"], exc)
                dead.append((dead_letter_key(topic, partition, offset),
                             dead_letter_record(data, topic, partition, offset, "DEDUP_OVERFLOW", str(exc), JOB_NAME,
                                                int(self.wall() * 1000))))
        return assigned, dead


def feast_item_writer(store: Any, feature_view: str = FEATURE_VIEW) -> Callable[[list[dict[str, Any]]], None]:
    """Rows -> one ``write_rows`` of UGT's Feast online store (same entries as `store.push`, cheaper)."""
    from infra.feast_online_store import open_online_store
    from jobs.user_state_logic import MonotonicClock

    online = open_online_store(store)
    view = store.get_feature_view(feature_view)
    clock = MonotonicClock()

    def write(rows: list[dict[str, Any]]) -> None:
        online.write_rows(store.config, view, rows, clock())

    return write
