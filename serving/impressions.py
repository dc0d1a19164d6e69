"""Impressions: every list /recommend served, published to Kafka (``Topics.impressions``) without ever slowing it.

The request path only appends ``(answer, served_at)`` to a bounded in-memory buffer (``impression_buffer``),
never waiting: a full buffer drops the impression and counts it. A daemon thread of the process that answered
(the engine process under ``engine: process`` or ``--workers N``: forks get their own buffer and thread, started
on first use) registers ``schemas/impression.avsc`` once, encodes each impression in the Confluent wire format
and hands it to confluent-kafka, whose own queue holds at most ``impression_buffer`` more
(``queue.buffering.max.messages``; a ``BufferError`` is a drop). A record Kafka has not confirmed within
``impression_timeout_ms`` fails and is counted as dropped. So a slow or stopped Kafka costs impressions,
never latency or errors: ``ugt_serving_impressions_dropped_total{reason}`` says how many, and
``ugt_serving_impressions_published_total`` how many Kafka confirmed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from infra.settings import Settings
from serving.metrics import ServingMetrics
from serving.service import Answer
from streams.avro_codegen import Encoder, compile_encoder
from streams.producer import KAFKA_LOG
from streams.serde import (
    HEADER,
    MAGIC,
    RegistryError,
    SchemaRegistryClient,
    load_schema,
    schema_text,
    subject_for,
)

log = logging.getLogger(__name__)

SCHEMA = "impression"
BUFFER_FULL, KAFKA_ERROR, ENCODE_ERROR, REGISTRY_ERROR = "buffer_full", "kafka_error", "encode_error", "registry_error"
REGISTRY_RETRY_S = 5.0  # an unreachable registry is asked again this often (impressions meanwhile dropped)


def impression_record(answer: Answer, served_at_ms: int) -> dict[str, Any]:
    """The Avro record of one served answer (schemas/impression.avsc)."""
    return {
        "request_id": answer.request_id,
        "user_id": answer.user_id,
        "experiment": answer.experiment,
        "arm": answer.arm,
        "model": answer.model,
        "domain": answer.domain,
        "items": [{"item_id": item.item_id, "position": position, "score": float(item.score)}
                  for position, item in enumerate(answer.items)],
        "served_at": served_at_ms,
        "fallback": answer.reason is not None,
        "fallback_reason": answer.reason,
    }


class ImpressionPublisher:
    """The :class:`serving.service.ImpressionSink` that publishes to Kafka from a background thread."""

    def __init__(self, settings: Settings, metrics: ServingMetrics, buffer_size: int = 10_000,
                 timeout_ms: float = 10_000.0, topic: str | None = None):
        self.settings = settings
        self.metrics = metrics  # replaced by RecommendService.use_metrics in a forked engine
        self.buffer_size = buffer_size
        self.timeout_ms = timeout_ms
        self.topic = topic or settings.topics.impressions
        self._pid = -1
        self._buffer: queue.Queue[tuple[Answer, int]] = queue.Queue(buffer_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the request path ------------------------------------------------------------------------------
    def offer(self, answer: Answer) -> None:
        """Queue the answer's impression; never blocks, never raises (a full buffer counts a drop)."""
        if self._pid != os.getpid():
            self._start()
        try:
            self._buffer.put_nowait((answer, int(time.time() * 1000)))
        except queue.Full:
            self._dropped(BUFFER_FULL)

    def _start(self) -> None:
        """A fresh buffer and thread in this process (after a fork the parent's are not ours to touch)."""
        self._pid = os.getpid()
        self._buffer = queue.Queue(self.buffer_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._buffer, self._stop),
                                        name="ugt-impressions", daemon=True)
        self._thread.start()

    def _dropped(self, reason: str, n: int = 1) -> None:
        self.metrics.impressions_dropped.labels(reason).inc(n)

    # -- the background thread -------------------------------------------------------------------------
    def _producer(self) -> Producer:
        return Producer({
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "enable.idempotence": True,  # a retried send is not a second impression
            "linger.ms": 20,
            "queue.buffering.max.messages": self.buffer_size,
            "message.timeout.ms": int(self.timeout_ms),
            "partitioner": "murmur2_random",  # keyed by user id, as the Java clients and the user events
            "on_delivery": self._on_delivery,
            "logger": KAFKA_LOG,
        })

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self.metrics.impressions_published.inc()
        else:
            self._dropped(KAFKA_ERROR)

    def _encoder(self) -> tuple[bytes, Encoder]:
        registry = SchemaRegistryClient(self.settings.registry_url, timeout_s=2.0)
        schema_id = registry.register(subject_for(self.topic), schema_text(SCHEMA))
        return HEADER.pack(MAGIC, schema_id), compile_encoder(load_schema(SCHEMA))

    def _run(self, buffer: queue.Queue[tuple[Answer, int]], stop: threading.Event) -> None:
        producer = self._producer()
        encoder: tuple[bytes, Encoder] | None = None
        next_try = 0.0
        while not stop.is_set():
            try:
                answer, served_at = buffer.get(timeout=0.05)
            except queue.Empty:
                producer.poll(0)
                continue
            if encoder is None and time.monotonic() >= next_try:
                try:
                    encoder = self._encoder()
                except (RegistryError, OSError) as exc:
                    log.warning("impressions: schema registry unavailable (%s); dropping until it answers", exc)
                    next_try = time.monotonic() + REGISTRY_RETRY_S
            if encoder is None:
                self._dropped(REGISTRY_ERROR)
                continue
            self._send(producer, encoder, answer, served_at)
            producer.poll(0)
        producer.flush(1.0)

    def _send(self, producer: Producer, encoder: tuple[bytes, Encoder], answer: Answer, served_at: int) -> None:
        header, encode_body = encoder
        try:
            value = header + encode_body(impression_record(answer, served_at))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            log.error("impression of request %s cannot be encoded: %s", answer.request_id, exc)
            self._dropped(ENCODE_ERROR)
            return
        try:
            producer.produce(self.topic, value, answer.user_id.encode())
        except BufferError:  # librdkafka's queue is full (Kafka slow or down): drop, never wait
            self._dropped(BUFFER_FULL)
        except Exception as exc:  # KafkaException for a bad topic etc.: still never the request's problem
            log.error("impression of request %s not produced: %s", answer.request_id, exc)
            self._dropped(KAFKA_ERROR)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop this process's thread (it flushes what it can within a second)."""
        self._stop.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout_s)
