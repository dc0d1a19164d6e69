"""The tokenize job on the standalone Flink cluster: every malformed kind in the DLQ, semantic IDs, the parquet lake.

One bounded run (`flink run -py jobs/tokenize_job.py`, exactly-once Kafka sinks) over 300 ML-100K events plus one
record of each malformed kind, on topics, a semantic-ID version and a lake folder of its own:
  * each malformed record is in events.dlq with its reason code, its original bytes and where it came from;
  * every valid event is in events.tokens once, with the semantic-ID levels of this run's store version
    (HSET ugt:sid:item:<version>, as the item_semantic_ids job writes it);
  * the lake (Flink's filesystem sink, parquet, dt= partitions, committed on checkpoints) holds exactly the
    same tokens, and `jobs.lake.lake_ratings` gives the trainer's ratings frame back.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fastavro
import pytest
import redis
from confluent_kafka import Producer
from test_event_path import read_topic, run_on_cluster, variant

from contracts.datasets import load_dataset, user_events
from contracts.redis_keys import item_key
from contracts.tokenizer import TokenizedEvent, tokenize_event
from infra.settings import get_settings
from jobs.lake import lake_ratings, read_lake
from streams.producer import EventPublisher
from streams.serde import AvroSerde, SchemaRegistryClient, encode_with_id
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration]

N_EVENTS = 300
MAX_BYTES = 2048
DAY_MS = 86_400_000


def malformed(serde: AvroSerde, subject: str, good: dict[str, Any], run: str) -> dict[str, bytes]:
    """reason code -> one record that must get it."""
    valid = serde.encode(subject, "user_event", good)
    missing_schema, string_schema = variant(drop="item_id"), variant(retype={"event_time": "string"})
    missing_id = serde.registry.register(f"ugt-test-{run}-missing-value", missing_schema)
    string_id = serde.registry.register(f"ugt-test-{run}-string-value", string_schema)

    def event(**over: Any) -> bytes:
        return serde.encode(subject, "user_event", {**good, "event_id": f"{good['event_id']}-{len(over)}-{over}",
                                                    **over})

    return {
        "BAD_MAGIC": f"not avro {run}".encode(),
        "UNKNOWN_SCHEMA": struct.pack(">bI", 0, 2_000_000_001) + valid[5:],
        "DECODE_ERROR": valid[:-3],
        "MISSING_FIELD": encode_with_id(missing_id, fastavro.parse_schema(json.loads(missing_schema)),
                                        {k: v for k, v in good.items() if k != "item_id"}),
        "WRONG_TYPE": encode_with_id(string_id, fastavro.parse_schema(json.loads(string_schema)),
                                     {**good, "event_time": "2001-01-01T00:00:00Z"}),
        "BAD_VALUE": event(user_id=""),
        "OVERSIZED": event(context={"blob": "x" * MAX_BYTES}),
        "FAR_FUTURE": event(event_time=int(time.time() * 1000) + 3 * DAY_MS),
        "TOO_OLD": event(event_time=315_532_800_000),  # 1980-01-01, before the default floor (1990)
        "UNKNOWN_ITEM": event(item_id=f"no-such-item-{run}"),
    }


@pytest.mark.parametrize("engine", ["python", "sql"])
def test_every_malformed_kind_semantic_ids_and_the_lake(stack: Any, tmp_path: Path, engine: str) -> None:
    """engine: tokenize's --engine (sql: decode, validate, tokenize and the semantic-ID lookup in the JVM)."""
    settings = get_settings()
    run = uuid.uuid4().hex[:8]
    raw, tokens, dlq = f"itk-{run}.raw", f"itk-{run}.tokens", f"itk-{run}.dlq"
    ensure_topics(settings, extra=[TopicSpec(raw), TopicSpec(tokens), TopicSpec(dlq, 1)])
    serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
    events = [{**e, "user_id": f"itk{run}-{e['user_id']}", "event_id": f"itk{run}-{e['event_id']}"}
              for e in user_events(load_dataset("ml-100k"), limit=N_EVENTS)]

    # -- this run's semantic-ID store version: every item of the events has an ID --
    version = f"it-{run}"
    client = redis.Redis.from_url(settings.redis_url)
    items = sorted({e["item_id"] for e in events})
    codes = {item: (int(item) % 7, int(item) % 5, i) for i, item in enumerate(items)}
    client.hset(item_key(version), mapping={item: "-".join(map(str, c)) for item, c in codes.items()})
    client.expire(item_key(version), 3600)

    with EventPublisher(settings) as publisher:
        for e in events:
            publisher.publish_user_event(e, topic=raw)
    bad = malformed(serde, f"{raw}-value", events[0], run)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for data in bad.values():
        producer.produce(raw, data)
    assert producer.flush(30) == 0

    lake = tmp_path / "lake"
    run_on_cluster("tokenize", [
        "--bounded", "--startup", "earliest", "--parallelism", "2", "--checkpoint-interval-ms", "3000",
        # process mode: fresh Python workers import this checkout (thread mode shares one interpreter per
        # TaskManager, which keeps the modules of whatever job imported them first)
        "--execution-mode", "process",
        "--delivery", "exactly-once", "--group-id", f"itk-{run}", "--source-topic", raw, "--tokens-topic", tokens,
        "--dlq-topic", dlq, "--sid-version", version, "--unknown-items", "dlq", "--max-record-bytes", str(MAX_BYTES),
        "--engine", engine,
        "--lake", str(lake)], settings)

    # -- dead letters: one per kind, with its code and original bytes --
    letters = [serde.decode(v).record for _, v in read_topic(settings, dlq)]
    by_original = {d["original"]: d for d in letters}
    assert len(letters) == len(bad)
    for code, data in bad.items():
        assert data in by_original, f"{code} record is not in the DLQ"
        letter = by_original[data]
        assert letter["reason_code"] == code, (code, letter["reason"])
        assert (letter["topic"], letter["job"]) == (raw, "tokenize") and letter["reason"]

    # -- tokens: every valid event once, with this version's semantic IDs --
    got = [TokenizedEvent.from_record(serde.decode(v).record) for _, v in read_topic(settings, tokens)]
    want = [tokenize_event(e, semantic_ids=codes[e["item_id"]], sid_version=version) for e in events]
    assert Counter(t.event_id for t in got) == Counter(e["event_id"] for e in events)
    assert sorted(got, key=lambda t: t.event_id) == sorted(want, key=lambda t: t.event_id)

    # -- the lake: the same tokens, committed parquet under dt= partitions --
    frame = read_lake(lake)
    assert len(frame) == len(events)
    by_id = {t.event_id: t for t in want}
    for row in frame.itertuples(index=False):
        t = by_id[row.event_id]
        assert (row.user_id, row.item_id, row.event_time, row.rating_token, row.weekday_token) == (
            t.user_id, t.item_id, t.event_time, t.rating_token, t.weekday_token)
        assert tuple(row.semantic_ids) == t.semantic_ids and row.sid_version == version
        assert row.dt == time.strftime("%Y-%m-%d", time.gmtime(t.event_time / 1000))
    partitions = sorted(p.name for p in lake.iterdir() if p.is_dir())
    assert partitions == sorted({f"dt={d}" for d in frame["dt"]})
    assert all((lake / p / "_SUCCESS").exists() for p in partitions)

    ratings = lake_ratings(lake)
    assert list(ratings.columns[:5]) == ["user_id", "item_id", "timestamp", "rating", "row"]
    assert sorted(zip(ratings["user_id"], ratings["item_id"], ratings["timestamp"], ratings["rating"],
                      strict=True)) == sorted(
        (e["user_id"], e["item_id"], e["event_time"] // 1000, e["rating"]) for e in events)
