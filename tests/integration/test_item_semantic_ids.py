"""item_semantic_ids on the real stack: item events -> Kafka -> the job ON THE STANDALONE FLINK CLUSTER
(`flink run -py`, bounded) -> decode index in Redis + Feast item_metadata; malformed records -> the DLQ.

One run builds a tiny artifact on synthetic items (ids and titles carry a run id, so the artifact and its
Redis keys are new each run), publishes 50 NEW item events (20 of them near-duplicates sharing one prefix, which
key_by(item_id) spreads over the 2 parallel instances) plus 2 malformed records to its own topic, runs
the job, and checks that every new item decodes from the Redis index (its code -> its item id), that its
Feast row carries the same semantic ID, that IDs are unique, and that the malformed records are dead-lettered
with their reasons. It also prints the delay from publish to decodable (it includes the job's start-up).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Producer

from contracts.redis_keys import (
    ARTIFACTS_KEY,
    active_version,
    code_string,
    dedup_namespace,
    feed_key,
    index_key,
    item_key,
    parse_code,
)
from infra.feast_store import open_feature_store
from infra.settings import REPO_ROOT, Settings
from jobs import cli as jobs_cli
from jobs.item_semantic_ids_logic import artifact_version, item_from_record
from models.semantic_ids import build_semantic_ids
from streams.producer import EventPublisher
from streams.serde import AvroSerde, SchemaRegistryClient
from streams.topics import TopicSpec, ensure_topics

pytestmark = pytest.mark.integration

N_ITEMS = 50
TWINS = 20  # of them share title, genres and year: only the dedup level tells them apart
JOB_TIMEOUT_S = 600
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "War"]
WORDS = "red blue night day love war star king queen city dark light game story ghost river".split()
CONFIG = {"quantizer": "rqkmeans", "codebook_sizes": [8, 8], "dedup_size": 64,
          "encoders": [{"type": "structured", "weight": 1.0, "hash_dim": 8}],
          "compare_baseline": False, "embedding_cache": "off", "progress": False}


def item_events(n: int, prefix: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    now_ms = int(time.time() * 1000)
    return [{
        "item_id": f"{prefix}{i}", "domain": "movie",
        "title": " ".join(rng.choice(WORDS, 2 + i % 3).tolist()).title(), "description": "",
        "categories": sorted(rng.choice(GENRES, 1 + i % 3, replace=False).tolist()),
        "attributes": {"year": str(int(rng.integers(1930, 2001)))}, "updated_at": now_ms,
    } for i in range(n)]


def ensure_feast_applied(settings: Settings) -> None:
    import subprocess

    store = open_feature_store(settings)
    try:
        store.get_feature_view("item_metadata")
    except Exception:  # registry empty or stale: apply the repo (what `ugt stack up` users do once)
        subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "feast"), "-c", str(settings.feature_repo), "apply"],
                       check=True)


def read_dlq(settings: Settings, topic: str, want: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    from confluent_kafka import Consumer

    serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None and len(out) >= want:
                break  # all we expect, and nothing more arrives
            if msg is None or msg.error():
                continue
            out.append(serde.decode(msg.value()).record)
    finally:
        consumer.close()
    return out


def test_item_semantic_ids_on_the_cluster(stack: Settings, tmp_path, record_property) -> None:
    settings = stack
    run = uuid.uuid4().hex[:8]
    source, dlq = f"it-{run}.items", f"it-{run}.dlq"
    active_key = f"test:{run}:sid:active"  # the job sets its own pointer, never the stack's ugt:sid:active
    ensure_topics(settings, extra=[TopicSpec(source), TopicSpec(dlq, 1)])
    ensure_feast_applied(settings)

    # -- a tiny artifact of this run's own catalog (so its version, and its Redis keys, are new) --
    catalog = item_events(150, f"it{run}-old-", seed=1)
    artifact = build_semantic_ids([item_from_record(r) for r in catalog], CONFIG, dataset=f"it-{run}")
    path = artifact.save(tmp_path / "sid")
    version = artifact_version(path)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        new = item_events(N_ITEMS, f"it{run}-new-", seed=2)
        for twin in new[:TWINS]:  # near-duplicates: one prefix, spread by key_by(item_id) over both instances
            twin.update({k: new[0][k] for k in ("title", "categories", "attributes")})
        with EventPublisher(settings) as publisher:
            for record in new:
                publisher.publish_item_event(record, topic=source)
            bad = {"BAD_MAGIC": f"not an item {run}".encode(),
                   "DECODE_ERROR": publisher.encode(source, "item_event", new[0])[:-9]}
        published_at = time.time()
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        for data in bad.values():
            producer.produce(source, data)
        assert producer.flush(30) == 0

        # -- the job, bounded, on the cluster; meanwhile watch the index for each item's arrival --
        args = ["--", "--artifact", str(path), "--source-topic", source, "--dlq-topic", dlq, "--bounded",
                "--startup", "earliest", "--group-id", f"it-{run}-items", "--batch-size", "16",
                "--parallelism", "2", "--checkpoint-interval-ms", "5000", "--active-key", active_key]
        failure: list[BaseException] = []

        def submit() -> None:
            try:
                jobs_cli.submit("item_semantic_ids", args, detached=False)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failure.append(exc)

        job = threading.Thread(target=submit, daemon=True)
        job.start()
        ids = [r["item_id"] for r in new]
        arrived: dict[str, float] = {}
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while len(arrived) < len(ids) and time.monotonic() < deadline and (job.is_alive() or not arrived):
            for item_id, code in zip(ids, client.hmget(item_key(version), ids), strict=True):
                if code is not None and item_id not in arrived:
                    arrived[item_id] = time.time()
            if not job.is_alive() and failure:
                break
            time.sleep(0.1)
        job.join(JOB_TIMEOUT_S)
        assert not failure, f"flink run failed: {failure[0]}; see var/log/flink/"
        assert not job.is_alive(), "the bounded job did not finish in time"
        for item_id, code in zip(ids, client.hmget(item_key(version), ids), strict=True):  # stragglers
            if code is not None:
                arrived.setdefault(item_id, time.time())
        assert set(arrived) == set(ids), f"{len(ids) - len(arrived)} items never became decodable"
        delays = np.array([arrived[i] - published_at for i in ids])
        assert np.isfinite(delays).all()
        p50, p99 = np.percentile(delays, [50, 99])
        record_property("new_item_delay_p50_s", round(float(p50), 3))
        record_property("new_item_delay_p99_s", round(float(p99), 3))
        print(f"\nnew item -> decodable by the generator index, over {len(ids)} items published before the job "
              f"started (so it includes the job's start-up): p50 {p50:.2f} s, p99 {p99:.2f} s, "
              f"min {delays.min():.2f} s, max {delays.max():.2f} s; steady-state delay: "
              "`python -m bench.nearline` (new_item_p99_s)")
        # the job made its artifact the active version (nothing was active under this key) and registered it
        assert active_version(client, active_key) == version
        assert client.hget(ARTIFACTS_KEY, version).decode() == str(path.resolve())

        # -- the generator's decode index: code -> item, item -> code, unique, full length --
        codes = {i: c.decode() for i, c in zip(ids, client.hmget(item_key(version), ids), strict=True)}
        decoded = client.hmget(index_key(version), [codes[i] for i in ids])
        assert [d.decode() for d in decoded] == ids
        sids = {i: parse_code(codes[i]) for i in ids}
        assert all(len(s) == artifact.num_levels for s in sids.values())
        table = {tuple(r) for r in artifact.codes.tolist()}
        assert len(set(sids.values())) == len(ids) and not set(sids.values()) & table
        # the twins: one prefix, TWINS distinct dedup indices, assigned by two parallel instances
        assert len({sids[i][:-1] for i in ids[:TWINS]}) == 1 and len({sids[i][-1] for i in ids[:TWINS]}) == TWINS
        # the artifact's own items are in the index too, under their offline codes
        assert client.hget(index_key(version), code_string(artifact.codes[0])).decode() == artifact.item_ids[0]
        # -- the feed live generators follow (serving/live_items.py): each new item once, with its code and
        # metadata; the artifact's own items are not on it (a model trained on the artifact has them) --
        feed = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(feed_key(version))]
        assert sorted(e["item_id"] for e in feed) == sorted(ids)
        by_item = {e["item_id"]: e for e in feed}
        assert all(by_item[i]["code"] == codes[i] for i in ids)
        assert json.loads(by_item[ids[-1]]["categories"]) == new[-1]["categories"]
        assert by_item[ids[-1]]["year"] == new[-1]["attributes"]["year"]

        # -- Feast item_metadata carries the same IDs --
        online = open_feature_store(settings).get_online_features(
            features=["item_metadata:semantic_ids", "item_metadata:title", "item_metadata:domain"],
            entity_rows=[{"item_id": i} for i in ids],
        ).to_dict()
        for n, record in enumerate(new):
            assert tuple(online["semantic_ids"][n]) == sids[record["item_id"]]
            assert (online["title"][n], online["domain"][n]) == (record["title"], "movie")

        # -- the malformed records, dead-lettered with their reasons --
        letters = read_dlq(settings, dlq, len(bad))
        by_original = {letter["original"]: letter for letter in letters}
        for code, data in bad.items():
            assert data in by_original, f"{code} record is not in the DLQ"
            letter = by_original[data]
            assert (letter["reason_code"], letter["topic"], letter["job"]) == (code, source, "item_semantic_ids")
        assert len(letters) == len(bad)
    finally:
        for key in (index_key(version), item_key(version), feed_key(version), active_key):
            client.delete(key)
        client.hdel(ARTIFACTS_KEY, version)
        from streams.bench_anchor import _drop

        for topic in (source, dlq):
            _drop(settings, topic)
        for key in client.scan_iter(f"{dedup_namespace(version)}:*"):
            client.delete(key)
