"""The whole event path on the real stack: Avro events -> Kafka -> tokenize + user_state ON THE STANDALONE
FLINK CLUSTER (`flink run -py`) -> Feast/Redis -> POST /recommend.

One run publishes 3,000 MovieLens-100K events (users and event ids prefixed with a run id, their own topics
and their own popularity domain, so reruns on a live stack see none of each other's data) plus one malformed
record of each kind, runs both jobs bounded, then checks that:
  * every user's state read back through Feast equals the offline reference exactly
    (states_from_events over tokenize_event of the same valid events);
  * every malformed record is in the DLQ with its reason code and its original bytes;
  * counts add up: valid + dead-lettered == published, events.tokens holds exactly the valid events;
  * item popularity in Redis counts every valid event;
  * /recommend answers known users from their state (no history items, not a fallback) and marks unknown users.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import time
import uuid
from collections import Counter
from typing import Any

import fastavro
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from contracts.datasets import load_dataset, user_events
from contracts.limits import MAX_ID_CHARS
from contracts.redis_keys import popularity_key
from contracts.tokenizer import TokenizedEvent, tokenize_event
from contracts.user_state_rule import FEATURE_NAMES, states_from_events
from infra.feast_store import open_feature_store
from infra.settings import REPO_ROOT, Settings, get_settings
from jobs import cli as jobs_cli
from streams.producer import EventPublisher
from streams.serde import AvroSerde, SchemaRegistryClient, encode_with_id, schema_text
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 3000
JOB_TIMEOUT_S = 600


def variant(drop: str | None = None, retype: dict[str, str] | None = None) -> str:
    schema = json.loads(schema_text("user_event"))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != drop]
    for f in schema["fields"]:
        if retype and f["name"] in retype:
            f["type"] = retype[f["name"]]
    return json.dumps(schema)


def malformed_records(serde: AvroSerde, run: str, good: dict[str, Any]) -> dict[str, bytes]:
    """One record per failure kind -> its bytes; the reason code each must get is the key's prefix."""
    valid = serde.encode(f"ugt-test-{run}-value", "user_event", good)
    missing = {k: v for k, v in good.items() if k != "item_id"}
    missing_schema = variant(drop="item_id")
    string_time_schema = variant(retype={"event_time": "string"})
    # broken producers' schemas live under their own subjects (the topic's subject would refuse them)
    missing_id = serde.registry.register("ugt-test-bad-value", missing_schema)
    string_id = serde.registry.register("ugt-test-bad-type-value", string_time_schema)

    def event(**over: Any) -> bytes:
        name = "-".join(over)
        record = {**good, "event_id": f"{good['event_id']}-{name}", **over}
        return serde.encode(f"ugt-test-{run}-value", "user_event", record)

    return {
        "BAD_MAGIC/garbage": f"not avro at all {run}".encode(),
        "UNKNOWN_SCHEMA/id": struct.pack(">bI", 0, 2_000_000_000) + valid[5:],
        "MISSING_FIELD/item_id": encode_with_id(missing_id, fastavro.parse_schema(json.loads(missing_schema)), missing),
        "WRONG_TYPE/event_time": encode_with_id(
            string_id, fastavro.parse_schema(json.loads(string_time_schema)),
            {**good, "event_time": "2001-01-01T00:00:00Z"}),
        "DECODE_ERROR/truncated": valid[:-7],
        # values no Python conversion may choke on (once a PROCESSING_ERROR), ids /recommend could never ask for
        "BAD_VALUE/rating_nan": event(rating=math.nan),
        "BAD_VALUE/duration_inf": event(duration_s=math.inf),
        "BAD_VALUE/user_id_too_long": event(user_id="u" * (MAX_ID_CHARS + 1)),
        "BAD_VALUE/item_id_too_long": event(item_id="i" * (MAX_ID_CHARS + 1)),
    }


def read_topic(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes]]:
    """Every committed record of a topic, from the beginning to the current end."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
        ends = {p: hi for p, (lo, hi) in marks.items() if hi > lo}  # empty partitions need no reading
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[tuple[bytes | None, bytes]] = []
        deadline = time.monotonic() + 120
        # positions, not message offsets: transactional writes leave commit markers that are never delivered
        while any(tp.offset < ends[tp.partition] for tp in consumer.position(
                [TopicPartition(topic, p) for p in ends])):
            assert time.monotonic() < deadline, f"timed out reading {topic}: {len(out)} records so far"
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            out.append((msg.key(), msg.value()))
        return out
    finally:
        consumer.close()


def ensure_feast_applied(settings: Settings) -> None:
    store = open_feature_store(settings)
    try:
        store.get_feature_view("user_recent_events")
    except Exception:  # registry empty or stale: apply the repo (what `ugt stack up` users do once)
        subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "feast"), "-c", str(settings.feature_repo), "apply"],
                       check=True)


def run_on_cluster(job: str, args: list[str], settings: Settings) -> None:
    jid = jobs_cli.submit(job, ["--", *args], detached=True)
    assert jid, f"flink run printed no job id for {job}"
    state = jobs_cli.wait(settings.flink_rest_url, jid, JOB_TIMEOUT_S)
    assert state == "FINISHED", f"{job} ({jid}) ended {state}; see var/log/flink/"


@pytest.mark.parametrize("engine", ["python", "sql"])
def test_event_path_on_the_cluster(stack: Any, engine: str) -> None:
    """engine: tokenize's --engine (sql: decode, validate and tokenize in the JVM, jobs/tokenize_sql.py)."""
    settings = get_settings()
    run = uuid.uuid4().hex[:8]
    raw, tokens, dlq = f"it-{run}.raw", f"it-{run}.tokens", f"it-{run}.dlq"
    domain = f"it{run}"
    ensure_topics(settings, extra=[TopicSpec(raw), TopicSpec(tokens), TopicSpec(dlq, 1)])
    ensure_feast_applied(settings)
    serde = AvroSerde(SchemaRegistryClient(settings.registry_url))

    # -- publish: valid events through the publisher, malformed ones raw --
    events = []
    for e in user_events(load_dataset("ml-100k"), limit=N_EVENTS):
        events.append({**e, "user_id": f"it{run}-{e['user_id']}", "event_id": f"it{run}-{e['event_id']}",
                       "domain": domain})
    with EventPublisher(settings) as publisher:
        for e in events:
            publisher.publish_user_event(e, topic=raw)
    bad = malformed_records(serde, run, events[0])
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for data in bad.values():
        producer.produce(raw, data)
    assert producer.flush(30) == 0
    published = len(events) + len(bad)

    # -- both jobs on the standalone cluster, bounded: each stops at the end present when it starts --
    common = ["--bounded", "--startup", "earliest", "--parallelism", "2", "--checkpoint-interval-ms", "5000"]
    # exactly-once: tokens and dead letters are Kafka transactions committed on checkpoints
    # no semantic-ID lookup (the expected tokens carry none) and no lake (test_tokenize_dlq_lake covers both)
    run_on_cluster("tokenize", [*common, "--delivery", "exactly-once", "--group-id", f"it-{run}-tokenize",
                                "--no-semantic-ids", "--lake", "", "--engine", engine, "--source-topic", raw,
                                "--tokens-topic", tokens, "--dlq-topic", dlq], settings)
    token_records = read_topic(settings, tokens)
    # what user_state must dead-letter itself: bytes that are no TokenizedEvent, and a valid token (a copy of
    # one already there) under another user's key
    (first_key, first_value) = token_records[0]
    bad_tokens = {"BAD_MAGIC": (b"u-x", b"\x07not-avro"),
                  "KEY_MISMATCH": (first_key + b"-other", first_value)}
    for key, data in bad_tokens.values():
        producer.produce(tokens, data, key=key)
    assert producer.flush(30) == 0
    run_on_cluster("user_state", [*common, "--group-id", f"it-{run}-user-state", "--source-topic", tokens,
                                  "--dlq-topic", dlq], settings)

    # -- counts and the dead letters --
    letters = [serde.decode(value).record for _, value in read_topic(settings, dlq)]
    dead = [d for d in letters if d["job"] == "tokenize"]
    assert len(token_records) + len(dead) == published
    from_user_state = {d["reason_code"]: d for d in letters if d["job"] == "user_state"}
    assert set(from_user_state) == set(bad_tokens), from_user_state
    for code, (_, data) in bad_tokens.items():
        assert from_user_state[code]["original"] == data and from_user_state[code]["topic"] == tokens
    token_events = [TokenizedEvent.from_record(serde.decode(v).record) for _, v in token_records]
    assert len(token_records) == len(events)
    assert Counter(t.event_id for t in token_events) == Counter(e["event_id"] for e in events)  # none lost, none doubled
    assert all(key == t.user_id.encode() for (key, _), t in zip(token_records, token_events, strict=True))
    assert sorted(token_events, key=lambda t: t.event_id) == sorted(
        (tokenize_event(e) for e in events), key=lambda t: t.event_id)
    by_original = {d["original"]: d for d in dead}
    for name, data in bad.items():
        assert data in by_original, f"{name} is not in the DLQ"
        letter = by_original[data]
        assert letter["reason_code"] == name.split("/")[0], (name, letter["reason"])
        assert (letter["topic"], letter["job"]) == (raw, "tokenize")

    # -- user state through Feast equals the offline reference, exactly --
    expected = states_from_events(tokenize_event(e) for e in events)
    users = sorted(expected)
    online = open_feature_store(settings).get_online_features(
        features=[f"user_recent_events:{f}" for f in FEATURE_NAMES],
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()
    for i, user in enumerate(users):
        got = {"user_id": user, **{f: online[f][i] for f in FEATURE_NAMES}}
        assert got == expected[user].to_feature_row(), f"state of {user} differs"

    # -- popularity: one count per valid event, in this run's own domain --
    client = redis.Redis.from_url(settings.redis_url)
    scores = dict(client.zrange(popularity_key(domain), 0, -1, withscores=True))
    assert {k.decode(): int(v) for k, v in scores.items()} == dict(Counter(e["item_id"] for e in events))

    # -- serving answers from that state --
    from fastapi.testclient import TestClient

    from serving.app import create_app

    with TestClient(create_app(settings)) as http:
        for user in users[:5]:
            response = http.post("/recommend", json={"user_id": user, "k": 10, "domain": domain})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["fallback"] is False, body
            items = [item["item_id"] for item in body["items"]]
            assert len(items) == 10 and not set(items) & set(expected[user].item_ids)
        response = http.post("/recommend", json={"user_id": f"it{run}-nobody", "k": 5, "domain": domain})
        assert response.status_code == 200 and response.json()["fallback"] is True
