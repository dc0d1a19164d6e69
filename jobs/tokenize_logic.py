"""The tokenize job's logic, without Flink: raw Kafka bytes -> TokenizedEvent bytes, or a dead letter.

Every failure a record can cause becomes a :class:`DeadLetterError` with a reason code, so the job sends
the record to events.dlq instead of dying: BAD_MAGIC / UNKNOWN_SCHEMA / DECODE_ERROR / OVERSIZED (from
streams.serde), MISSING_FIELD / WRONG_TYPE / BAD_VALUE (from models.tokenizer), FAR_FUTURE (event time
more than a day ahead of the wall clock) and PROCESSING_ERROR (anything else the record triggered).
A Schema Registry outage is not the record's fault: RegistryError propagates and Flink restarts the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.tokenizer import MAX_FUTURE_SKEW_MS, TokenizedEvent, TokenizeError, tokenize_event
from streams.serde import (
    AvroSerde,
    RegistryError,
    SerdeError,
    encode_with_id,
    load_schema,
    schema_text,
    subject_for,
)

JOB_NAME = "tokenize"
MAX_REASON_CHARS = 1000
REASON_CODES = (
    "BAD_MAGIC", "UNKNOWN_SCHEMA", "DECODE_ERROR", "OVERSIZED",
    "MISSING_FIELD", "WRONG_TYPE", "BAD_VALUE", "FAR_FUTURE", "PROCESSING_ERROR",
)


class DeadLetterError(ValueError):
    """A record the job cannot use; carries the dead letter's reason code and text."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code
        self.reason = reason[:MAX_REASON_CHARS]


def decode_and_tokenize(serde: AvroSerde, data: bytes | None, now_ms: int) -> TokenizedEvent:
    """Wire-format bytes -> TokenizedEvent, or DeadLetterError with the reason code."""
    try:
        decoded = serde.decode(data)
        event = tokenize_event(decoded.record)
    except (SerdeError, TokenizeError) as exc:
        raise DeadLetterError(exc.reason_code, exc.reason) from exc
    except RegistryError:
        raise
    except Exception as exc:  # the record made the decoder or tokenizer fail in a way nobody named yet
        raise DeadLetterError("PROCESSING_ERROR", f"{exc.__class__.__name__}: {exc}") from exc
    if event.event_time > now_ms + MAX_FUTURE_SKEW_MS:
        raise DeadLetterError(
            "FAR_FUTURE", f"event_time {event.event_time} is more than {MAX_FUTURE_SKEW_MS} ms after now ({now_ms})"
        )
    return event


def dead_letter_record(
    original: bytes | None, topic: str, partition: int, offset: int,
    reason_code: str, reason: str, job: str, failed_at_ms: int,
) -> dict[str, Any]:
    """A record of schemas/dead_letter.avsc (a null value is kept as empty bytes)."""
    return {
        "original": bytes(original) if original is not None else b"",
        "topic": topic,
        "partition": int(partition),
        "offset": int(offset),
        "reason_code": reason_code,
        "reason": reason[:MAX_REASON_CHARS],
        "job": job,
        "failed_at": int(failed_at_ms),
    }


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    """DLQ records are keyed by where the original came from, so replays of it land beside it."""
    return f"{topic}:{partition}:{offset}".encode()


@dataclass(frozen=True)
class Output:
    """One result: `dead` is None for a token, else the dead letter's reason code."""

    key: bytes
    value: bytes
    dead: str | None = None


class EventTokenizer:
    """Decode, validate, tokenize and encode one record; what the Flink operator calls per record.

    Schemas are registered once here (the registry client caches ids and parsed schemas), so the
    per-record path makes no registry call except the first lookup of each unseen schema id.
    """

    def __init__(
        self, serde: AvroSerde, tokens_topic: str, dlq_topic: str, job: str = JOB_NAME,
        clock: Callable[[], float] = time.time,
    ):
        self.serde = serde
        self.job = job
        self.clock = clock
        self.tokens_schema_id = serde.registry.register(subject_for(tokens_topic), schema_text("tokenized_event"))
        self.dlq_schema_id = serde.registry.register(subject_for(dlq_topic), schema_text("dead_letter"))
        self.tokens_schema = load_schema("tokenized_event")
        self.dlq_schema = load_schema("dead_letter")

    def process(self, data: bytes | None, topic: str, partition: int, offset: int) -> Output:
        now_ms = int(self.clock() * 1000)
        try:
            event = decode_and_tokenize(self.serde, data, now_ms)
        except DeadLetterError as exc:
            return self.dead_letter(data, topic, partition, offset, exc.reason_code, exc.reason, now_ms)
        value = encode_with_id(self.tokens_schema_id, self.tokens_schema, event.to_record())
        return Output(key=event.user_id.encode(), value=value)

    def dead_letter(
        self, data: bytes | None, topic: str, partition: int, offset: int, code: str, reason: str, now_ms: int
    ) -> Output:
        record = dead_letter_record(data, topic, partition, offset, code, reason, self.job, now_ms)
        value = encode_with_id(self.dlq_schema_id, self.dlq_schema, record)
        return Output(key=dead_letter_key(topic, partition, offset), value=value, dead=code)
