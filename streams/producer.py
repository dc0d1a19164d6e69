"""Publish Avro events to Kafka: idempotent, acks=all, batched, every delivery accounted for.

Records are in the Confluent wire format of :mod:`streams.serde` (schema registered through the serde's
registry client under ``<topic>-value``); the Avro body comes from a schema-compiled encoder
(:mod:`streams.avro_codegen`) that writes the same bytes as fastavro at a fraction of the cost. Keys are the user id for user events and the item id for item events, and the partitioner is
murmur2 (the Java client's), so one user's events land in one partition in publish order — what the
per-user state downstream relies on — whichever client wrote them. The Kafka record timestamp is the
publish time; the event time travels in the record's ``event_time`` field.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from infra.settings import Settings, get_settings
from streams.avro_codegen import Encoder, compile_encoder
from streams.records import KEY_FIELD, RecordError
from streams.serde import (
    HEADER,
    MAGIC,
    AvroSerde,
    SchemaRegistryClient,
    load_schema,
    schema_text,
    subject_for,
)

# Tuned on the 2-core box (see streams/bench_anchor.py): loopback bandwidth is free, CPU is not, so no
# compression; large batches and a short linger amortise the per-request cost of acks=all.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,  # no duplicates or reordering on retries (implies acks=all, max 5 in flight)
    "acks": "all",
    "linger.ms": 10,
    "batch.num.messages": 10_000,
    "batch.size": 1_000_000,
    "compression.type": "none",
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "message.timeout.ms": 120_000,
    "partitioner": "murmur2_random",  # same key -> same partition as Java producers (Flink, kafka-console)
}


@cache
def _compiled(schema_name: str) -> Encoder:
    return compile_encoder(load_schema(schema_name))


class _Repeats(logging.Filter):
    """Lets a librdkafka message through once per `every_s` (a broker outage logs a line per retry)."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) < self.every_s:
            return False
        self._last[key] = now
        return True


KAFKA_LOG = logging.getLogger("ugt.kafka")
KAFKA_LOG.addFilter(_Repeats())


class PublishError(RuntimeError):
    """Some records were not delivered; the message says how many and why."""


@dataclass
class DeliveryStats:
    """What the broker confirmed so far."""

    produced: int = 0
    delivered: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)  # delivered per topic

    @property
    def pending(self) -> int:
        return self.produced - self.delivered - self.failed


class EventPublisher:
    """One Kafka producer plus the Avro serde; use as a context manager so close() flushes."""

    def __init__(
        self,
        settings: Settings | None = None,
        serde: AvroSerde | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.settings = settings or get_settings()
        self.serde = serde or AvroSerde(SchemaRegistryClient(self.settings.registry_url))
        self.config = {"bootstrap.servers": self.settings.kafka_bootstrap, **PRODUCER_DEFAULTS, **(config or {})}
        self.config["on_delivery"] = self._on_delivery
        self.config.setdefault("error_cb", self._on_error)
        self.config.setdefault("logger", KAFKA_LOG)  # librdkafka logs via logging (deduplicated), not raw stderr
        self._producer = Producer(self.config)
        self.stats = DeliveryStats()
        self.client_errors: Counter[str] = Counter()
        self._encoders: dict[tuple[str, str], tuple[bytes, Encoder]] = {}

    # -- delivery accounting (called from poll()/flush() on this thread) --
    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.stats.delivered += 1
            self.stats.by_topic[msg.topic()] += 1
        else:
            self.stats.failed += 1
            self.stats.errors[f"{err.name()}: {err.str()}"] += 1

    def _on_error(self, err: KafkaError) -> None:
        # Transient client errors (broker down, retrying) are retried by librdkafka; keep them for the report.
        self.client_errors[f"{err.name()}: {err.str()}"] += 1

    def _encoder(self, topic: str, schema_name: str) -> tuple[bytes, Encoder]:
        key = (topic, schema_name)
        if key not in self._encoders:
            # Registers the schema under <topic>-value once (the registry refuses incompatible changes).
            schema_id = self.serde.registry.register(subject_for(topic), schema_text(schema_name))
            self._encoders[key] = (HEADER.pack(MAGIC, schema_id), _compiled(schema_name))
        return self._encoders[key]

    def encode(self, topic: str, schema_name: str, record: dict[str, Any]) -> bytes:
        """The wire-format bytes of a record: the bytes AvroSerde.encode writes (tested), schema id looked up once."""
        header, encode_body = self._encoder(topic, schema_name)
        try:
            return header + encode_body(record)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise RecordError([f"{schema_name} record cannot be encoded: {exc}"]) from exc

    def publish(self, topic: str, schema_name: str, record: dict[str, Any], key: str | None = None) -> None:
        """Queue one record; delivery is confirmed asynchronously (see flush())."""
        if key is None:
            key_field = KEY_FIELD.get(schema_name)
            key = record.get(key_field) if key_field else None
        value = self.encode(topic, schema_name, record)
        key_bytes = key.encode() if key is not None else None
        while True:
            try:
                self._producer.produce(topic, value, key_bytes)
                break
            except BufferError:  # local queue full: serve delivery reports until there is room
                self._producer.poll(0.05)
        self.stats.produced += 1
        if self.stats.produced % 1000 == 0:
            self._producer.poll(0)

    def publish_user_event(self, record: dict[str, Any], topic: str | None = None) -> None:
        self.publish(topic or self.settings.topics.raw, "user_event", record, record["user_id"])

    def publish_item_event(self, record: dict[str, Any], topic: str | None = None) -> None:
        self.publish(topic or self.settings.topics.items, "item_event", record, record["item_id"])

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve delivery reports; returns how many were served."""
        return self._producer.poll(timeout_s)

    def flush(self, timeout_s: float = 60.0) -> DeliveryStats:
        """Wait for every queued record; PublishError if any failed or are still undelivered at the timeout."""
        deadline = time.monotonic() + timeout_s
        remaining = self._producer.flush(timeout_s)
        while remaining and time.monotonic() < deadline:
            remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
        self._producer.poll(0)
        if remaining or self.stats.failed or self.stats.pending:
            raise PublishError(self.describe_failure(timeout_s, remaining))
        return self.stats

    def describe_failure(self, timeout_s: float, still_queued: int) -> str:
        s = self.stats
        lines = [
            f"{s.produced - s.delivered} of {s.produced} record(s) not delivered to {self.settings.kafka_bootstrap}: "
            f"{s.failed} failed, {max(still_queued, s.pending)} still undelivered after {timeout_s:g} s"
        ]
        lines += [f"  {count} x {error}" for error, count in s.errors.most_common(5)]
        lines += [f"  client error {count} x {error}" for error, count in self.client_errors.most_common(3)]
        if not s.errors and self.client_errors:
            lines.append("  is Kafka up? `ugt stack status`")
        return "\n".join(lines)

    def abort(self) -> int:
        """Drop everything still queued (after an error or Ctrl-C); returns how many records were dropped."""
        pending = self.stats.pending
        self._producer.purge()
        self._producer.flush(0)
        return pending

    def close(self, timeout_s: float = 60.0) -> DeliveryStats:
        return self.flush(timeout_s)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.flush()
        else:  # an error is already on its way out; still try to send what was queued, but don't mask it
            self._producer.flush(5.0)
