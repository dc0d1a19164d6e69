"""`ugt semantic-ids backfill` on real Kafka + Redis (+ Feast): a new artifact version without downtime.

A 'running job' (the item_semantic_ids operator's own logic — follow_active + ItemBatcher — in a thread over a
real Kafka consumer, so the test needs no Flink slot) serves version A. While a reader keeps resolving
ugt:sid:active (this test's own key) and decoding a fixed set of items, the backfill re-encodes the catalog into
version B, items are published between its passes and after it, and the pointer flips. Checked: the reader never
missed an item, every item ends up in B's index with a unique code, A's index still serves, the job moved to B
for later items, Feast rows carry B's IDs; a version that would drop items is refused (nothing flipped).
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Consumer

from contracts.redis_keys import (
    ARTIFACTS_KEY,
    active_version,
    dedup_namespace,
    index_key,
    item_key,
    parse_code,
)
from infra.feast_store import open_feature_store
from infra.settings import REPO_ROOT, Settings
from jobs.item_semantic_ids_backfill import backfill
from jobs.item_semantic_ids_logic import (
    ItemBatcher,
    artifact_version,
    decode_item_event,
    follow_active,
    item_from_record,
)
from models.semantic_ids import build_semantic_ids
from streams.producer import EventPublisher
from streams.serde import AvroSerde, SchemaRegistryClient
from streams.topics import TopicSpec, ensure_topics

pytestmark = pytest.mark.integration

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "War"]
WORDS = "red blue night day love war star king queen city dark light game story ghost river".split()


def config(sizes: list[int]) -> dict[str, Any]:
    return {"quantizer": "rqkmeans", "codebook_sizes": sizes, "dedup_size": 64,
            "encoders": [{"type": "structured", "weight": 1.0, "hash_dim": 8}],
            "compare_baseline": False, "embedding_cache": "off", "progress": False}


def item_events(n: int, prefix: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{
        "item_id": f"{prefix}{i}", "domain": "movie",
        "title": " ".join(rng.choice(WORDS, 2 + i % 3).tolist()).title(), "description": "",
        "categories": sorted(rng.choice(GENRES, 1 + i % 3, replace=False).tolist()),
        "attributes": {"year": str(int(rng.integers(1930, 2001)))}, "updated_at": int(time.time() * 1000),
    } for i in range(n)]


class RunningJob(threading.Thread):
    """The item_semantic_ids operator's logic over a real consumer: decode, batch, assign under the active version."""

    def __init__(self, settings: Settings, topic: str, artifact: str, active_key: str):
        super().__init__(daemon=True)
        self.settings, self.topic, self.artifact, self.active_key = settings, topic, artifact, active_key
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.follower: Any = None

    def run(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url)
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap, "group.id": f"job-{uuid.uuid4().hex}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        try:
            serde = AvroSerde(SchemaRegistryClient(self.settings.registry_url))
            self.follower = follow_active(client, self.artifact, key=self.active_key)
            batcher = ItemBatcher(self.follower, max_items=16, max_delay_s=0.05)
            consumer.subscribe([self.topic])
            self.ready.set()
            while not self.stop.is_set():
                for msg in consumer.consume(num_messages=100, timeout=0.05):
                    if not msg.error():
                        batcher.add(decode_item_event(serde, msg.value()), (msg.value(), self.topic, 0, 0))
                if batcher.due():
                    batcher.flush()
            batcher.flush()
        except BaseException as exc:  # noqa: BLE001 - the test thread reports it
            self.error = exc
            self.ready.set()
        finally:
            consumer.close()


def wait_indexed(client: redis.Redis, version: str, ids: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(c is not None for c in client.hmget(item_key(version), ids)):
            return
        time.sleep(0.05)
    raise AssertionError(f"items not indexed under {version} within {timeout_s} s")


def test_backfill_flips_without_downtime(stack: Settings, tmp_path) -> None:
    settings = stack
    run = uuid.uuid4().hex[:8]
    topic, active_key = f"bf-{run}.items", f"test:{run}:sid:active"
    ensure_topics(settings, extra=[TopicSpec(topic, 2)])
    catalog0 = [item_from_record(r) for r in item_events(120, f"bf{run}-base-", seed=1)]
    path_a = build_semantic_ids(catalog0, config([8, 8]), dataset=run).save(tmp_path / "a")
    path_b = build_semantic_ids(catalog0, config([4, 16]), dataset=run).save(tmp_path / "b")
    other = [item_from_record(r) for r in item_events(60, f"bf{run}-other-", seed=5)]
    path_d = build_semantic_ids(other, config([8, 8]), dataset=run).save(tmp_path / "d")
    va, vb, vd = (artifact_version(p) for p in (path_a, path_b, path_d))
    assert len({va, vb, vd}) == 3
    client = redis.Redis.from_url(settings.redis_url)
    publisher = EventPublisher(settings)
    job = RunningJob(settings, topic, str(path_a), active_key)
    reader_stop, misses, versions_seen = threading.Event(), [], set()
    try:
        before = item_events(60, f"bf{run}-c1-", seed=2)
        for rec in before:
            publisher.publish_item_event(rec, topic=topic)
        publisher.flush(30)
        job.start()
        assert job.ready.wait(60) and job.error is None, job.error
        c1 = [r["item_id"] for r in before]
        wait_indexed(client, va, c1)
        assert active_version(client, active_key) == va  # the job activated its artifact (none was active)

        def reader() -> None:  # a generator/tokenizer: resolve the pointer, then decode, again and again
            while not reader_stop.is_set():
                version = active_version(client, active_key)
                versions_seen.add(version)
                codes = client.hmget(item_key(version), c1)
                if any(c is None for c in codes):
                    misses.append((version, sum(c is None for c in codes)))
                found = [c for c in codes if c is not None]
                items = client.hmget(index_key(version), found) if found else []
                if items != [i.encode() for i, c in zip(c1, codes, strict=True) if c is not None]:
                    misses.append((version, "index disagrees"))
                time.sleep(0.002)

        watcher = threading.Thread(target=reader, daemon=True)
        watcher.start()
        during = item_events(20, f"bf{run}-c2-", seed=3)

        def publish_during() -> None:  # between the passes: the job still writes them under A
            for rec in during:
                publisher.publish_item_event(rec, topic=topic)
            publisher.flush(30)
            wait_indexed(client, va, [r["item_id"] for r in during])

        report = backfill(settings, path_b, topic=topic, active_key=active_key, batch_size=25, grace_s=0.5,
                          progress=False, after_pass1=publish_during)
        assert report.flipped and (report.previous, report.version) == (va, vb)
        assert active_version(client, active_key) == vb
        after = item_events(15, f"bf{run}-c3-", seed=4)
        for rec in after:
            publisher.publish_item_event(rec, topic=topic)
        publisher.flush(30)
        every = c1 + [r["item_id"] for r in during] + [r["item_id"] for r in after]
        wait_indexed(client, vb, every)
        reader_stop.set()
        watcher.join(10)
        assert job.error is None, job.error
        assert job.follower.version == vb and job.follower.switches == 1  # the running job followed the flip
        assert client.hmget(item_key(va), [r["item_id"] for r in after]) == [None] * len(after)  # new items: B only

        assert not misses, f"a reader missed items: {misses[:5]}"
        assert versions_seen == {va, vb}
        assert report.items == len(c1) + len(during) and report.catch_up_records >= 0
        codes_b = dict(zip(every, client.hmget(item_key(vb), every), strict=True))
        assert len(set(codes_b.values())) == len(every)  # unique under B
        table_b = {tuple(r) for r in np.load(path_b / "arrays.npz")["codes"].tolist()}
        assert not {parse_code(c) for c in codes_b.values()} & table_b
        assert all(client.hget(index_key(vb), c).decode() == i for i, c in codes_b.items())
        assert all(c is not None for c in client.hmget(item_key(va), c1))  # the old version still serves
        assert report.feast_rows == report.items
        online = open_feature_store(settings).get_online_features(
            features=["item_metadata:semantic_ids"], entity_rows=[{"item_id": i} for i in c1]).to_dict()
        assert [tuple(s) for s in online["semantic_ids"]] == [parse_code(codes_b[i]) for i in c1]
        print(f"\nbackfill {va} -> {vb}: {report.items} items, {report.catalog_records} records "
              f"({report.catch_up_records} in the catch-up), {report.seconds:.2f} s; reader never missed")

        # a version that would lose items (built on another catalog) is refused, and nothing flips
        job.stop.set()
        job.join(30)
        refused = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "ugt"), "semantic-ids", "backfill", "--artifact",
                                  str(path_d), "--topic", topic, "--active-key", active_key, "--quiet",
                                  "--no-feast"], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1, refused.stderr
        assert "have no code under" in refused.stderr and "not flipping" in refused.stderr
        assert active_version(client, active_key) == vb
    finally:
        reader_stop.set()
        job.stop.set()
        for v in (va, vb, vd):
            client.delete(index_key(v), item_key(v))
            for key in client.scan_iter(f"{dedup_namespace(v)}:*"):
                client.delete(key)
            client.hdel(ARTIFACTS_KEY, v)
        client.delete(active_key)
        from streams.bench_anchor import _drop

        _drop(settings, topic)


def test_job_defaults_to_the_active_artifact(stack: Settings, tmp_path) -> None:
    """`--artifact` left out: the job starts on the artifact registered for the active version, or says why not."""
    from contracts.redis_keys import activate, register_artifact
    from jobs.common import JobSetupError
    from jobs.item_semantic_ids_job import active_artifact

    run = uuid.uuid4().hex[:8]
    key = f"test:{run}:sid:active"
    client = redis.Redis.from_url(stack.redis_url)
    with pytest.raises(JobSetupError, match="no artifact is registered for the active version"):
        active_artifact(stack.redis_url, key)
    version = f"test-{run}"
    try:
        register_artifact(client, version, tmp_path)
        activate(client, version, key)
        assert active_artifact(stack.redis_url, key) == str(tmp_path.resolve())
        with pytest.raises(JobSetupError, match="unreachable"):
            active_artifact("redis://localhost:1", key)
    finally:
        client.delete(key)
        client.hdel(ARTIFACTS_KEY, version)
