"""The anchor for the streaming-throughput target: Avro user events through Kafka and back, no Flink.

`kafka_raw_events_per_s(settings, n)` publishes n user events with the same EventPublisher the CLI uses
(idempotent, acks=all, Avro via the registry) to a fresh topic shaped like events.raw, while a consumer
in another process (as Flink would be) reads and decodes them; the rate is n over the time from the
first produce to the last decoded record. Whatever the Flink jobs reach is compared with this.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import requests

from infra.settings import Settings, get_settings
from streams.producer import EventPublisher
from streams.serde import subject_for
from streams.topics import DEFAULT_PARTITIONS, TopicSpec, admin_client, ensure_topics


@dataclass
class AnchorResult:
    events: int
    produce_s: float  # first produce -> every record acknowledged (acks=all)
    end_to_end_s: float  # first produce -> last record consumed and decoded
    consumed: int
    producer_cpu_s: float  # CPU of the producing process (with librdkafka threads): load-independent
    topic: str  # the scratch topic (deleted after the run)

    @property
    def produce_events_per_s(self) -> float:
        return self.events / self.produce_s

    @property
    def events_per_s(self) -> float:
        return self.consumed / self.end_to_end_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "produce_events_per_s": round(self.produce_events_per_s, 1),
                "events_per_s": round(self.events_per_s, 1)}


def synthetic_user_events(n: int, users: int = 6040, items: int = 3706, seed: int = 0) -> list[dict[str, Any]]:
    """n user events shaped like ML-1M ratings (ids, 1-5 stars, increasing event time)."""
    rng = random.Random(seed)
    start_ms = 956_703_932_000
    return [
        {
            "event_id": f"bench:{i}", "user_id": str(rng.randint(1, users)), "item_id": str(rng.randint(1, items)),
            "action": "RATE", "event_time": start_ms + i * 1000, "rating": float(rng.randint(1, 5)),
            "duration_s": None, "domain": "movie", "context": {},
        }
        for i in range(n)
    ]


def _consume(bootstrap: str, registry_url: str, topic: str, partitions: int, n: int, timeout_s: float,
             ready: Any, out: Any) -> None:
    """Consumer process: read and decode n records; report (count, time of the last one, undecodable)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from streams.serde import AvroSerde, SchemaRegistryClient, SerdeError

    serde = AvroSerde(SchemaRegistryClient(registry_url))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "fetch.min.bytes": 1, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    ready.set()
    count = bad = 0
    last = time.time()
    deadline = time.monotonic() + timeout_s
    try:
        while count + bad < n and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=10_000, timeout=0.2):
                if msg.error():
                    continue
                try:
                    serde.decode(msg.value())
                    count += 1
                except SerdeError:
                    bad += 1
                last = time.time()
    finally:
        consumer.close()
        out.put((count, last, bad))


def kafka_raw_anchor(settings: Settings | None = None, n: int = 200_000, timeout_s: float = 300.0) -> AnchorResult:
    """Publish n Avro user events and consume them back in a second process; timings of both."""
    settings = settings or get_settings()
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, extra=[TopicSpec(topic, DEFAULT_PARTITIONS)])
    events = synthetic_user_events(n)
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=_consume, daemon=True, args=(
        settings.kafka_bootstrap, settings.registry_url, topic, DEFAULT_PARTITIONS, n, timeout_s, ready, out))
    consumer.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("benchmark consumer did not start within 60 s")
        publisher = EventPublisher(settings)
        publisher.encode(topic, "user_event", events[0])  # register the schema before the clock starts
        start, cpu_start = time.time(), time.process_time()
        for event in events:
            publisher.publish(topic, "user_event", event, event["user_id"])
        publisher.flush(timeout_s)
        produced, cpu = time.time(), time.process_time() - cpu_start
        consumed, last, bad = out.get(timeout=timeout_s)
        consumer.join(10)
    finally:
        if consumer.is_alive():
            consumer.terminate()
        _drop(settings, topic)
    if bad or consumed != n:
        raise RuntimeError(f"benchmark read back {consumed} of {n} records ({bad} undecodable) from {topic}")
    return AnchorResult(n, produced - start, last - start, consumed, cpu, topic)


def _drop(settings: Settings, topic: str) -> None:
    """Remove the benchmark topic and its registry subject so runs leave nothing behind."""
    admin = admin_client(settings)  # keep a reference: the futures fail if the client is destroyed first
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        try:
            future.result()
        except Exception:  # noqa: BLE001 - best effort cleanup; the result is already measured
            pass
    try:
        requests.delete(f"{settings.registry_url}/subjects/{subject_for(topic)}", timeout=5)
    except requests.RequestException:
        pass


def kafka_raw_events_per_s(settings: Settings | None = None, n: int = 200_000) -> float:
    """Events/s of Avro user events produced and consumed back through Kafka (the anchor; see module doc)."""
    return kafka_raw_anchor(settings, n).events_per_s


if __name__ == "__main__":
    import json
    import sys

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    print(json.dumps(kafka_raw_anchor(get_settings(), count).as_dict()))
