"""serving/impressions.py: the impression record, and a publisher that drops and counts instead of waiting.

The drop path runs the real confluent-kafka client and registry client against closed ports (nothing listens),
which is what a stopped stack looks like; the Kafka round trip itself is tests/integration/test_serving_impressions.py.
"""

from __future__ import annotations

import io
import socket
import time

import fastavro
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view

from infra.settings import Settings
from serving.batcher import Queued
from serving.config import ServingConfig
from serving.fallback import PopularityFallback, PopularityGenerator
from serving.generator import ScoredItem
from serving.http_models import RecommendRequest
from serving.impressions import ImpressionPublisher, impression_record
from serving.metrics import ServingMetrics
from serving.reranker import FilterReranker
from serving.service import Answer, Components, RecommendService
from streams.avro_codegen import compile_encoder
from streams.serde import load_schema


def answer(request_id: str = "r1", reason: str | None = None) -> Answer:
    return Answer("u1", [ScoredItem("a", 3.5), ScoredItem("b", 1.25)], reason, "ugt-run-abc", 2,
                  {"total": 1.0}, request_id, "ranker", "treatment", "movie")


def test_the_record_lists_items_by_position_and_round_trips_through_the_schema():
    record = impression_record(answer(reason="timeout"), 1_700_000_000_123)
    assert record["items"] == [{"item_id": "a", "position": 0, "score": 3.5},
                               {"item_id": "b", "position": 1, "score": 1.25}]
    assert (record["fallback"], record["fallback_reason"], record["arm"]) == (True, "timeout", "treatment")
    schema = load_schema("impression")
    decoded = fastavro.schemaless_reader(io.BytesIO(compile_encoder(schema)(record)), schema, schema,
                                         return_record_name=False)
    assert decoded["served_at"].timestamp() == 1_700_000_000.123
    assert {k: v for k, v in decoded.items() if k != "served_at"} == {k: v for k, v in record.items()
                                                                     if k != "served_at"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sum_dropped(metrics: ServingMetrics) -> dict[str, float]:
    return {s.labels["reason"]: s.value for family in metrics.impressions_dropped.collect()
            for s in family.samples if s.name.endswith("_total")}


def test_without_kafka_and_registry_every_impression_is_dropped_and_counted_never_raised(monkeypatch):
    monkeypatch.setenv("UGT_KAFKA_PORT", str(closed_port()))
    monkeypatch.setenv("UGT_REGISTRY_PORT", str(closed_port()))
    metrics = ServingMetrics()
    publisher = ImpressionPublisher(Settings(), metrics, buffer_size=50, timeout_ms=200)
    try:
        for n in range(500):
            publisher.offer(answer(f"r{n}"))  # never blocks: a full buffer is a drop
        deadline = time.monotonic() + 20
        while sum(sum_dropped(metrics).values()) < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        publisher.close()
    dropped = sum_dropped(metrics)
    assert sum(dropped.values()) == 500 and dropped["registry_error"] > 0, dropped
    assert dropped["buffer_full"] + dropped["registry_error"] == 500  # nothing reached Kafka to fail there
    assert [s.value for f in metrics.impressions_published.collect() for s in f.samples
            if s.name.endswith("_total")] == [0.0]


class RecordingSink:
    def __init__(self) -> None:
        self.offered: list[Answer] = []

    def offer(self, answer: Answer) -> None:
        self.offered.append(answer)


def test_an_answer_past_request_timeout_is_not_an_impression():
    """The HTTP side has answered with its timeout fallback by then (and that one is the impression)."""
    clock_redis = FakeZsetRedis({"ugt:popularity:movie": {"m1": 3, "m2": 2}})
    fallback = PopularityFallback(clock_redis, clock=FakeClock())
    parts = Components(FakeStateReader({"u1": view("u1", [])}), PopularityGenerator(fallback), fallback,
                       FilterReranker())
    service = RecommendService(ServingConfig(request_timeout_ms=100), parts, ServingMetrics())
    service.impressions = sink = RecordingSink()
    now = time.perf_counter()
    fresh, late = (Queued(RecommendRequest(user_id="u1", k=1), arrived, None, None) for arrived in (now, now - 0.5))
    answers = service.run_batch([fresh, late])
    assert [a.request_id for a in sink.offered] == [answers[0].request_id]
    timeout = service.fallback_answer(RecommendRequest(user_id="u1", k=1), "timeout", 0.2)
    assert sink.offered[-1] is timeout and timeout.reason == "timeout"
