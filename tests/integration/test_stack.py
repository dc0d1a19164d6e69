"""The local stack, end to end against the real services (no mocks): Kafka, Redis, registry, Flink."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra import stack as stack_mod
from infra.flink_home import flink_bin, flink_env
from infra.jars import kafka_connector_jar_url
from infra.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _topic(settings: Settings, name: str, partitions: int = 1) -> str:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        future.result(timeout=30)
    return name


def _consume(settings: Settings, topic: str, want: int, timeout_s: float = 30.0) -> list[tuple[bytes, bytes]]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return got


def test_project_topics_exist_with_their_partitions(stack: Settings) -> None:
    topics = AdminClient({"bootstrap.servers": stack.kafka_bootstrap}).list_topics(timeout=10).topics
    t = stack.topics
    assert {name: len(topics[name].partitions) for name in (t.raw, t.items, t.tokens, t.dlq)} == {
        t.raw: 4, t.items: 2, t.tokens: 4, t.dlq: 1
    }


def test_kafka_produce_then_consume(stack: Settings) -> None:
    topic = _topic(stack, f"ugt.test.stack-{uuid.uuid4().hex[:8]}")
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    sent = [(f"k{i}".encode(), f"value-{i}".encode()) for i in range(3)]
    for key, value in sent:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(15) == 0
    assert _consume(stack, topic, want=3) == sent


def test_redis_ping_and_roundtrip(stack: Settings) -> None:
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    assert client.ping() is True
    key = f"ugt:test:stack:{uuid.uuid4().hex}"
    client.set(key, "v", ex=60)
    assert client.get(key) == b"v"
    client.delete(key)


def test_registry_register_fetch_and_reject_incompatible(stack: Settings) -> None:
    base = stack.registry_url
    subject = f"ugt-test-{uuid.uuid4().hex[:8]}-value"
    schema = (REPO / "schemas" / "user_event.avsc").read_text()
    headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
    r = requests.post(f"{base}/subjects/{subject}/versions", json={"schema": schema}, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    schema_id = r.json()["id"]
    # the same schema again: same id, no new version (what idempotent producers rely on)
    again = requests.post(f"{base}/subjects/{subject}/versions", json={"schema": schema}, headers=headers, timeout=10)
    assert again.json()["id"] == schema_id
    fetched = requests.get(f"{base}/schemas/ids/{schema_id}", timeout=10).json()["schema"]
    assert json.loads(fetched) == json.loads(schema)
    latest = requests.get(f"{base}/subjects/{subject}/versions/latest", timeout=10).json()
    assert (latest["id"], latest["version"]) == (schema_id, 1)
    assert subject in requests.get(f"{base}/subjects", timeout=10).json()
    # a new required field without a default breaks BACKWARD: the registry must refuse it
    broken = json.loads(schema)
    broken["fields"].append({"name": "required_new", "type": "string"})
    check = requests.post(f"{base}/compatibility/subjects/{subject}/versions/latest",
                          json={"schema": json.dumps(broken)}, headers=headers, timeout=10)
    assert check.json()["is_compatible"] is False
    refused = requests.post(f"{base}/subjects/{subject}/versions", json={"schema": json.dumps(broken)},
                            headers=headers, timeout=10)
    assert refused.status_code == 409
    requests.delete(f"{base}/subjects/{subject}", timeout=10)


def test_flink_cluster_has_its_taskmanagers_with_two_slots_each(stack: Settings) -> None:
    overview = requests.get(f"{stack.flink_rest_url}/overview", timeout=10).json()
    assert overview["taskmanagers"] == stack.flink_taskmanagers
    assert overview["slots-total"] == 2 * stack.flink_taskmanagers
    assert overview["flink-version"].startswith("2.2")


def test_status_reports_every_service_healthy(stack: Settings) -> None:
    rows = stack_mod.status(settings=stack)
    assert [r["service"] for r in rows] == list(stack_mod.SERVICES)
    assert all(r["healthy"] for r in rows), rows


@pytest.mark.slow
def test_flink_run_py_job_with_the_kafka_connector_jar(stack: Settings) -> None:
    """`flink run -py` against the cluster: a Kafka source -> Python map -> Kafka sink job finishes."""
    tag = uuid.uuid4().hex[:8]
    source = _topic(stack, f"ugt.test.echo-in-{tag}")
    sink = _topic(stack, f"ugt.test.echo-out-{tag}")
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    for i in range(5):
        producer.produce(source, value=f"hello-{i}".encode())
    assert producer.flush(15) == 0
    job = Path(__file__).with_name("flink_kafka_echo_job.py")
    run = subprocess.run(
        [str(flink_bin()), "run", "-py", str(job), "--bootstrap", stack.kafka_bootstrap,
         "--source", source, "--sink", sink, "--jar", kafka_connector_jar_url(stack)],
        env=flink_env(stack), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "has finished" in run.stdout
    values = sorted(v.decode() for _, v in _consume(stack, sink, want=5))
    assert values == [f"HELLO-{i}" for i in range(5)]
