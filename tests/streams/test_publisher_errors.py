"""streams/producer.py: configuration and the undelivered-records error, with a broker that is not there."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from infra.settings import get_settings
from streams.producer import PRODUCER_DEFAULTS, EventPublisher, PublishError
from streams.records import RecordError
from streams.serde import AvroSerde

EVENT = {"event_id": "e1", "user_id": "42", "item_id": "7", "action": "CLICK", "event_time": 1_700_000_000_000,
         "rating": None, "duration_s": None, "domain": "movie", "context": {}}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_producer_defaults_are_safe() -> None:
    assert PRODUCER_DEFAULTS["enable.idempotence"] is True and PRODUCER_DEFAULTS["acks"] == "all"
    assert PRODUCER_DEFAULTS["partitioner"] == "murmur2_random"  # same partition as Java clients for a key


def test_undelivered_records_are_counted_and_explained(serde: AvroSerde, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UGT_KAFKA_BOOTSTRAP", f"127.0.0.1:{closed_port()}")
    publisher = EventPublisher(get_settings(), serde=serde, config={"message.timeout.ms": 1500})
    for i in range(3):
        publisher.publish_user_event({**EVENT, "event_id": f"e{i}"}, topic="t.nowhere")
    assert publisher.stats.produced == 3
    with pytest.raises(PublishError) as err:
        publisher.flush(timeout_s=10)
    text = str(err.value)
    assert "3 of 3 record(s) not delivered" in text and "3 failed" in text
    assert "_MSG_TIMED_OUT" in text or "TIMED_OUT" in text
    assert publisher.stats.failed == 3 and publisher.stats.delivered == 0


def test_flush_timeout_reports_still_undelivered(serde: AvroSerde, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UGT_KAFKA_BOOTSTRAP", f"127.0.0.1:{closed_port()}")
    publisher = EventPublisher(get_settings(), serde=serde, config={"message.timeout.ms": 60_000})
    publisher.publish_user_event(EVENT, topic="t.nowhere")
    with pytest.raises(PublishError, match=r"1 still undelivered after 0.5 s"):
        publisher.flush(timeout_s=0.5)
    assert publisher.abort() == 1


def test_invalid_record_is_a_record_error(serde: AvroSerde) -> None:
    settings = replace(get_settings())
    publisher = EventPublisher(settings, serde=serde)
    with pytest.raises(RecordError, match="user_event record cannot be encoded"):
        publisher.publish("t.bad", "user_event", {**EVENT, "action": "NOT_AN_ACTION"})
    assert publisher.stats.produced == 0


def test_publisher_writes_the_bytes_the_serde_writes(serde: AvroSerde) -> None:
    publisher = EventPublisher(get_settings(), serde=serde)
    for record in (EVENT, {**EVENT, "rating": 3.5, "context": {"device": "tv"}}):
        data = publisher.encode("t.same", "user_event", record)
        assert data == serde.encode("t.same-value", "user_event", record)
        assert serde.decode(data).record["user_id"] == "42"
