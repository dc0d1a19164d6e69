"""Experiments and impressions on the real stack: `ugt serve --workers 2` with an experiment and impressions on.

Responses carry the arm the assignment function gives; every served list lands on events.impressions in the
Confluent wire format, decodable through the registry, equal to its response; with Kafka stopped, requests still
get 200s within a bounded time while impressions are dropped and counted. Needs Kafka, the registry and Redis
only (the fixture starts only those; UGT_STACK_TEARDOWN=1 stops what it started).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from bench.serving import start_server
from infra import stack as stack_mod
from infra.settings import Settings, get_settings
from serving.config import build_config
from serving.experiments import Experiments
from streams.serde import AvroSerde, SchemaRegistryClient
from streams.topics import ensure_pipeline
from tests.integration.test_serving import seed_serving_state

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUN = uuid.uuid4().hex[:8]
DOMAIN = f"itest-ab-{RUN}"
POPULAR = {str(i): float(100 - i) for i in range(30)}
KNOWN = {f"itest-ab-{RUN}-{n}": ["0", "1"] for n in range(80)}  # with state: the arm's model answers them
NEEDED = ["kafka", "registry", "redis"]
CONFIG = {
    "generator": "popularity", "default_domain": DOMAIN, "log_level": "warning", "impressions": True,
    "impression_buffer": 1000, "impression_timeout_ms": 1500,
    "experiments": {f"ab-{RUN}": {"arms": {"treatment": {"share": 0.3, "generator_version": "v2"},
                                           "control": {"share": 0.5},
                                           "holdout": {"share": 0.1, "holdout": True}}}},
}


@pytest.fixture(scope="module")
def kafka_registry_redis() -> Iterator[Settings]:
    settings = get_settings()
    was_up = {str(row["service"]) for row in stack_mod.status(only=NEEDED, settings=settings) if row["healthy"]}
    stack_mod.up(only=NEEDED, settings=settings, log=lambda line: None, after_kafka=ensure_pipeline)
    client = seed_serving_state(settings, KNOWN, DOMAIN, POPULAR)
    yield settings
    client.delete(f"ugt:popularity:{DOMAIN}")
    started = [name for name in NEEDED if name not in was_up]
    if started and os.environ.get("UGT_STACK_TEARDOWN") == "1":
        stack_mod.down(only=started, settings=settings, log=lambda line: None)


@pytest.fixture(scope="module")
def served(kafka_registry_redis: Settings, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("impressions")
    server = start_server("impressions", folder, os.environ | {"PYTHONPATH": str(REPO)}, CONFIG, workers=2)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def recommend(url: str, user: str) -> requests.Response:
    return requests.post(f"{url}/recommend", json={"user_id": user, "k": 5}, headers={"connection": "close"},
                         timeout=10)


def end_offsets(settings: Settings) -> list[TopicPartition]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"ends-{uuid.uuid4().hex}"})
    topic = settings.topics.impressions
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    out = [TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
           for p in partitions]
    consumer.close()
    return out


def read_impressions(settings: Settings, start: list[TopicPartition], wanted: set[str],
                     timeout_s: float = 30.0) -> dict[str, dict]:
    """Impressions of ``wanted`` request ids written after ``start``, decoded through the registry."""
    serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign(start)
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while wanted - set(found) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        decoded = serde.decode(msg.value())
        assert decoded.schema_name == "ugt.events.Impression"
        if decoded.record["request_id"] in wanted:
            assert msg.key() == decoded.record["user_id"].encode()
            found[decoded.record["request_id"]] = decoded.record
    consumer.close()
    return found


def dropped(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "ugt_serving_impressions_dropped_total")


def published(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "ugt_serving_impressions_published_total")


def test_arms_follow_the_assignment_and_impressions_match_the_responses(served, kafka_registry_redis):
    settings = kafka_registry_redis
    experiments = Experiments(build_config(CONFIG, env={}))
    start = end_offsets(settings)
    bodies = {}
    for n in range(80):
        user = f"itest-ab-{RUN}-{n}"
        response = recommend(served, user)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = experiments.assign(DOMAIN, user)
        assert body["arm"] == (expected.arm if expected else None)
        assert body["experiment"] == (f"ab-{RUN}" if expected else None)
        # the arm's model answered (treatment: popularity v2 over the domain's v1), history left out
        assert not body["fallback"], body
        assert body["model"] == ("popularity-v2" if body["arm"] == "treatment" else "popularity-v1")
        assert [i["item_id"] for i in body["items"]] == ["2", "3", "4", "5", "6"]
        bodies[body["request_id"]] = body
    assert {b["arm"] for b in bodies.values()} >= {"treatment", "control"}
    found = read_impressions(settings, start, set(bodies))
    assert set(found) == set(bodies)
    for request_id, record in found.items():
        body = bodies[request_id]
        assert (record["user_id"], record["experiment"], record["arm"], record["model"], record["domain"],
                record["fallback"], record["fallback_reason"]) == (
            body["user_id"], body["experiment"], body["arm"], body["model"], DOMAIN, body["fallback"],
            body["fallback_reason"])
        assert [(i["item_id"], i["position"], i["score"]) for i in record["items"]] == [
            (i["item_id"], n, i["score"]) for n, i in enumerate(body["items"])]
        assert abs(record["served_at"].timestamp() - time.time()) < 120
    deadline = time.monotonic() + 10  # delivery reports reach the engine's counter a poll (<= 50 ms) after
    while published(served) < len(bodies) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert published(served) >= len(bodies), requests.get(f"{served}/metrics", timeout=10).text


def test_kafka_stopped_requests_unaffected_impressions_dropped_and_counted(served, kafka_registry_redis):
    settings = kafka_registry_redis
    before = dropped(served)
    stack_mod.down(only=["kafka"], settings=settings, log=lambda line: None)
    try:
        slowest = 0.0
        for n in range(40):
            began = time.perf_counter()
            response = recommend(served, f"itest-ab-down-{RUN}-{n}")
            slowest = max(slowest, time.perf_counter() - began)
            assert response.status_code == 200, response.text
        assert slowest < 1.0  # request_timeout_ms is 1 s: Kafka never holds a request up
        deadline = time.monotonic() + 20
        while dropped(served) - before < 40 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dropped(served) - before >= 40  # every impression of the outage: counted, not lost silently
    finally:
        stack_mod.up(only=["kafka"], settings=settings, log=lambda line: None, after_kafka=ensure_pipeline)
