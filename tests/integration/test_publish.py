"""Publishing against the real stack: the `ugt publish` CLI writes Avro to Kafka, we read it back exactly.

Each test publishes to its own fresh topics (so other suites' traffic on events.raw cannot disturb the
counts), consumes them from the beginning with a plain consumer, decodes with the serde and compares
record by record. The registry must hold the `<topic>-value` subjects afterwards.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from contracts.datasets import item_events, load_dataset, user_events
from infra.settings import Settings, get_settings
from streams.records import validate_record
from streams.serde import HEADER, AvroSerde, SchemaRegistryClient, SerdeError, load_schema, subject_for
from ugt.cli import main as ugt

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(stack: Any) -> Settings:
    return get_settings()


@pytest.fixture
def serde(settings: Settings) -> AvroSerde:
    return AvroSerde(SchemaRegistryClient(settings.registry_url))


@pytest.fixture
def fresh_topic(settings: Settings) -> Iterator[Callable[[str], str]]:
    """Makes unique topic names; the topics and their subjects are deleted after the test."""
    made: list[str] = []

    def make(kind: str) -> str:
        made.append(f"test.publish.{kind}.{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield make
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:  # best effort: a cleanup failure must not fail the test that already passed
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        existing = admin.list_topics(timeout=10).topics
        doomed = [t for t in made if t in existing]
        if doomed:
            for future in admin.delete_topics(doomed, operation_timeout=30).values():
                future.result()
        for topic in made:
            requests.delete(f"{settings.registry_url}/subjects/{subject_for(topic)}", timeout=5)
    except (KafkaException, requests.RequestException) as exc:
        print(f"cleanup of {made} failed: {exc}")


def ms(value: Any) -> Any:
    return round(value.timestamp() * 1000) if isinstance(value, datetime) else value


def read_topic(settings: Settings, serde: AvroSerde, topic: str, expected: int, timeout_s: float = 60.0
               ) -> list[tuple[int, int, str, dict[str, Any]]]:
    """(partition, offset, key, record) of every record in the topic, in partition/offset order."""
    import time

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    rows = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(rows) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=5000, timeout=0.5):
                assert msg.error() is None, msg.error()
                record = {k: ms(v) for k, v in serde.decode(msg.value()).record.items()}
                rows.append((msg.partition(), msg.offset(), msg.key().decode(), record))
        # nothing beyond what we expect: poll once more for strays
        extra = [m for m in consumer.consume(num_messages=10, timeout=1.0) if m.error() is None]
    finally:
        consumer.close()
    assert not extra, f"{len(extra)} unexpected extra record(s) in {topic}"
    return sorted(rows, key=lambda r: (r[0], r[1]))


def subjects(settings: Settings) -> list[str]:
    response = requests.get(f"{settings.registry_url}/subjects", timeout=5)
    response.raise_for_status()
    return response.json()


def assert_user_partitioning(rows: list[tuple[int, int, str, dict[str, Any]]], published: list[dict[str, Any]]) -> None:
    """Key = user id, one partition per user, and per user the publish order is kept."""
    partition_of: dict[str, set[int]] = defaultdict(set)
    per_user_read: dict[str, list[str]] = defaultdict(list)
    for partition, _offset, key, record in rows:
        assert key == record["user_id"]
        partition_of[key].add(partition)
        per_user_read[key].append(record["event_id"])
    assert all(len(p) == 1 for p in partition_of.values())
    per_user_sent: dict[str, list[str]] = defaultdict(list)
    for record in published:
        per_user_sent[record["user_id"]].append(record["event_id"])
    assert per_user_read == per_user_sent


def test_publish_jsonl_file(settings: Settings, serde: AvroSerde, tmp_path: Path,
        fresh_topic: Callable[[str], str]) -> None:
    topic = fresh_topic("file")
    actions = load_schema("user_event")["fields"][3]["type"]["symbols"]
    lines = []
    for i in range(300):
        record: dict[str, Any] = {"event_id": f"f{i}", "user_id": f"u{i % 17}", "item_id": f"i{i % 41}",
                                  "action": actions[i % len(actions)], "event_time": 1_700_000_000_000 + i * 250}
        if i % 3 == 0:
            record["rating"] = (i % 10) / 2
        if i % 5 == 0:
            record["context"] = {"device": "tv", "page": str(i)}
        if i % 7 == 0:
            record["event_time"] = datetime.fromtimestamp(record["event_time"] / 1000).astimezone().isoformat()
        lines.append(record)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert ugt(["publish", "file", str(path), "--topic", topic, "--no-progress"]) == 0

    expected = [validate_record("user_event", r) for r in lines]
    rows = read_topic(settings, serde, topic, len(expected))
    assert sorted((r[3] for r in rows), key=lambda r: r["event_id"]) == sorted(expected, key=lambda r: r["event_id"])
    assert len(rows) == 300
    assert_user_partitioning(rows, expected)
    assert subject_for(topic) in subjects(settings)


def test_bad_file_publishes_nothing(settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture,
        fresh_topic: Callable[[str], str]) -> None:
    topic = fresh_topic("bad")
    path = tmp_path / "events.csv"
    path.write_text("event_id,user_id,item_id,action,event_time\ne1,1,2,RATE,5\ne2,1,2,NOPE,6\n")
    assert ugt(["publish", "file", str(path), "--topic", topic, "--no-progress"]) == 2
    assert f"{path}:3: field action: 'NOPE' is not one of" in capsys.readouterr().err
    from confluent_kafka.admin import AdminClient

    assert topic not in AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10).topics
    assert subject_for(topic) not in subjects(settings)


def test_replay_ml100k_with_items(settings: Settings, serde: AvroSerde, capsys: pytest.CaptureFixture,
        fresh_topic: Callable[[str], str]) -> None:
    topic, items_topic = fresh_topic("raw"), fresh_topic("items")
    rc = ugt(["publish", "replay", "ml-100k", "--limit", "2000", "--items", "--topic", topic,
              "--items-topic", items_topic, "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["events"]["count"] == 2000 and report["items"]["count"] == 1682

    dataset = load_dataset("ml-100k")
    expected_events = list(user_events(dataset, 2000))
    expected_items = list(item_events(dataset))
    rows = read_topic(settings, serde, topic, 2000)
    got = [r[3] for r in rows]
    assert sorted(got, key=lambda r: r["event_id"]) == sorted(expected_events, key=lambda r: r["event_id"])
    assert_user_partitioning(rows, expected_events)
    # per partition, records are in event-time order (the replay order)
    for partition in {r[0] for r in rows}:
        times = [r[3]["event_time"] for r in rows if r[0] == partition]
        assert times == sorted(times)

    item_rows = read_topic(settings, serde, items_topic, len(expected_items))
    assert all(key == record["item_id"] for _, _, key, record in item_rows)
    assert sorted((r[3] for r in item_rows), key=lambda r: int(r["item_id"])) == expected_items
    assert {subject_for(topic), subject_for(items_topic)} <= set(subjects(settings))
    versions = requests.get(f"{settings.registry_url}/subjects/{subject_for(topic)}/versions/latest", timeout=5).json()
    assert json.loads(versions["schema"])["name"] == "UserEvent"


def test_single_event_cli(settings: Settings, serde: AvroSerde, capsys: pytest.CaptureFixture,
        fresh_topic: Callable[[str], str]) -> None:
    topic = fresh_topic("one")
    event = {"event_id": "x1", "user_id": "u1", "item_id": "i1", "action": "LIKE", "event_time": 1_700_000_000_000}
    assert ugt(["publish", "event", json.dumps(event), "--topic", topic]) == 0
    assert "published 1 user_event" in capsys.readouterr().out
    [(_, _, key, record)] = read_topic(settings, serde, topic, 1)
    assert key == "u1" and record == validate_record("user_event", event)
    assert ugt(["publish", "event", '{"user_id": "u1"}', "--topic", topic]) == 2
    assert "missing required field(s) event_id, item_id, action, event_time" in capsys.readouterr().err


def test_unknown_schema_id_against_the_real_registry(serde: AvroSerde) -> None:
    with pytest.raises(SerdeError) as err:
        serde.decode(HEADER.pack(0, 2**31 - 7) + b"\x02a")
    assert err.value.reason_code == "UNKNOWN_SCHEMA"


def test_bench_anchor_reads_back_everything(settings: Settings) -> None:
    import time

    from confluent_kafka.admin import AdminClient

    from streams.bench_anchor import kafka_raw_anchor

    result = kafka_raw_anchor(settings, 5000)
    assert result.consumed == 5000 and result.events_per_s > 0 and result.end_to_end_s >= result.produce_s * 0.5
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    deadline = time.monotonic() + 15
    while result.topic in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
        time.sleep(0.5)
    assert result.topic not in admin.list_topics(timeout=10).topics, "the benchmark topic was left behind"
    assert subject_for(result.topic) not in subjects(settings)


def test_registry_enforces_the_tested_rule(settings: Settings, fresh_topic: Callable[[str], str]) -> None:
    """The subject gets user_event's rule (FULL_TRANSITIVE): the registry refuses what test_schema_compat forbids."""
    import copy

    from streams.serde import schema_text
    from streams.topics import compatibility_rules, ensure_subject

    topic = fresh_topic("rule")
    first = ensure_subject(settings, topic, "user_event")
    assert ensure_subject(settings, topic, "user_event") == first  # idempotent
    config = requests.get(f"{settings.registry_url}/config/{subject_for(topic)}", timeout=5).json()
    assert config["compatibilityLevel"] == compatibility_rules()["user_event"] == "FULL_TRANSITIVE"

    def post(schema: dict) -> requests.Response:
        return requests.post(f"{settings.registry_url}/subjects/{subject_for(topic)}/versions",
                             json={"schema": json.dumps(schema)}, timeout=5)

    base = json.loads(schema_text("user_event"))
    forward_breaking = copy.deepcopy(base)
    forward_breaking["fields"] = [f for f in base["fields"] if f["name"] != "item_id"]  # old readers need it
    assert post(forward_breaking).status_code == 409
    compatible = copy.deepcopy(base)
    compatible["fields"].append({"name": "note", "type": ["null", "string"], "default": None})
    response = post(compatible)
    assert response.status_code == 200 and response.json()["id"] != first
