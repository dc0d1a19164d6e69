"""The tokenize job's logic, without Flink: raw Kafka bytes -> TokenizedEvent bytes, or a dead letter.

Every failure a record can cause becomes a :class:`DeadLetterError` with a reason code, so the job sends
the record to events.dlq instead of dying: OVERSIZED (over ``Rules.max_record_bytes``), BAD_MAGIC /
UNKNOWN_SCHEMA / DECODE_ERROR (from streams.serde), MISSING_FIELD / WRONG_TYPE / BAD_VALUE (from
contracts.tokenizer), FAR_FUTURE (event time more than ``max_future_skew_ms`` after the wall clock), TOO_OLD
(event time before ``min_event_time_ms``), UNKNOWN_ITEM (the semantic-ID store has no code for the item,
with ``unknown_items="dlq"``) and PROCESSING_ERROR (anything else the record triggered).
A Schema Registry outage is not the record's fault: RegistryError propagates and Flink restarts the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from contracts.redis_keys import item_key
from contracts.tokenizer import MAX_FUTURE_SKEW_MS, TokenizedEvent, TokenizeError, tokenize_event
from jobs.dead_letters import DeadLetterError, dead_letter_key, dead_letter_record
from streams.avro_codegen import compile_encoder
from streams.avro_decoder import DecodeFailed, Decoder, compile_decoder
from streams.serde import (
    HEADER,
    MAGIC,
    MAX_RECORD_BYTES,
    AvroSerde,
    RegistryError,
    SerdeError,
    decode_body,
    load_schema,
    schema_text,
    subject_for,
)

if TYPE_CHECKING:  # jobs.sid_cache imports item_semantic_ids_logic, which imports this module
    from jobs.sid_cache import SemanticIdCache

JOB_NAME = "tokenize"
UNKNOWN_ITEM_POLICIES = ("pass", "dlq")
# 1990-01-01 UTC: MovieLens-100K starts in 1997 and ML-1M in 2000, so the default floor accepts both
DEFAULT_MIN_EVENT_TIME_MS = 631_152_000_000


@dataclass(frozen=True)
class Rules:
    """What the job accepts (its command-line options); everything else is dead-lettered with a reason code."""

    max_record_bytes: int = MAX_RECORD_BYTES
    max_future_skew_ms: int = MAX_FUTURE_SKEW_MS
    min_event_time_ms: int = DEFAULT_MIN_EVENT_TIME_MS
    unknown_items: str = "pass"  # pass: tokens without semantic IDs | dlq: UNKNOWN_ITEM dead letter

    def __post_init__(self) -> None:
        if self.unknown_items not in UNKNOWN_ITEM_POLICIES:
            raise ValueError(f"unknown_items must be one of {UNKNOWN_ITEM_POLICIES}, got {self.unknown_items!r}")
        if not 5 < self.max_record_bytes <= MAX_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be in (5, {MAX_RECORD_BYTES}], got {self.max_record_bytes}")
        if self.max_future_skew_ms < 0:
            raise ValueError(f"max_future_skew_ms must be >= 0, got {self.max_future_skew_ms}")


def parse_time_floor(text: str | int) -> int:
    """--min-event-time: YYYY-MM-DD (UTC midnight) or epoch milliseconds -> epoch ms."""
    import datetime as dt

    value = str(text).strip()
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        day = dt.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    except ValueError as exc:
        raise ValueError(f"--min-event-time must be YYYY-MM-DD or epoch ms, got {text!r}") from exc
    return int(day.timestamp() * 1000)


def resolve_sid_version(redis_url: str, version: str = "") -> str:
    """The version the job would read: `version`, else ugt:sid:active; ValueError saying what to do if none."""
    import redis

    from contracts.redis_keys import ACTIVE_KEY
    from infra.redis_client import redis_from_url

    client = redis_from_url(redis_url, socket_timeout=5)
    try:
        chosen = version or (client.get(ACTIVE_KEY) or b"").decode()
        if not chosen:
            raise ValueError(f"no semantic-ID version is active ({ACTIVE_KEY} is unset at {redis_url}): run the "
                             "item_semantic_ids job, or pass --sid-version, or --unknown-items pass")
        if not client.exists(item_key(chosen)):
            raise ValueError(f"{item_key(chosen)} does not exist at {redis_url}: no item has an ID in version {chosen}")
        return chosen
    except redis.RedisError as exc:
        raise ValueError(f"Redis at {redis_url} is unreachable ({exc}); is the stack up?") from exc
    finally:
        client.close()


def check_event_time(event: TokenizedEvent, now_ms: int, rules: Rules) -> None:
    """FAR_FUTURE / TOO_OLD dead letters for event times outside what the job accepts."""
    if event.event_time > now_ms + rules.max_future_skew_ms:
        raise DeadLetterError(
            "FAR_FUTURE",
            f"event_time {event.event_time} is more than {rules.max_future_skew_ms} ms after now ({now_ms})",
        )
    if event.event_time < rules.min_event_time_ms:
        raise DeadLetterError(
            "TOO_OLD", f"event_time {event.event_time} is before the floor {rules.min_event_time_ms} (--min-event-time)"
        )


def decode_and_tokenize(serde: AvroSerde, data: bytes | None, now_ms: int, rules: Rules = Rules()) -> TokenizedEvent:
    """Wire-format bytes -> TokenizedEvent, or DeadLetterError with the reason code (reference path, fastavro)."""
    if data is not None and len(data) > rules.max_record_bytes:
        raise DeadLetterError("OVERSIZED", f"record is {len(data)} bytes, limit {rules.max_record_bytes}")
    try:
        decoded = serde.decode(data)
        event = tokenize_event(decoded.record)
    except (SerdeError, TokenizeError) as exc:
        raise DeadLetterError(exc.reason_code, exc.reason) from exc
    except RegistryError:
        raise
    except Exception as exc:  # the record made the decoder or tokenizer fail in a way nobody named yet
        raise DeadLetterError("PROCESSING_ERROR", f"{exc.__class__.__name__}: {exc}") from exc
    check_event_time(event, now_ms, rules)
    return event


@dataclass(frozen=True)
class Output:
    """One result: `dead` is None for a token, else the dead letter's reason code."""

    key: bytes
    value: bytes
    dead: str | None = None
    event: TokenizedEvent | None = None  # the token itself (for the lake), None for a dead letter


class EventTokenizer:
    """Decode, validate, tokenize and encode one record; what the Flink operator calls per record.

    Schemas are registered once here (the registry client caches ids and parsed schemas), so the
    per-record path makes no registry call except the first lookup of each unseen schema id (unknown ids
    are remembered for ``UNKNOWN_SCHEMA_RETRY_S``, so a flood of them costs one lookup each that long).
    Each writer schema gets a compiled decoder and the output schemas compiled encoders (streams/avro_*),
    byte-for-byte what fastavro writes; semantic IDs come from a :class:`jobs.sid_cache.SemanticIdCache`.
    """

    UNKNOWN_SCHEMA_RETRY_S = 5.0

    def __init__(
        self, serde: AvroSerde, tokens_topic: str, dlq_topic: str, job: str = JOB_NAME,
        clock: Callable[[], float] = time.time, rules: Rules = Rules(), sids: SemanticIdCache | None = None,
    ):
        if rules.unknown_items == "dlq" and (sids is None or sids.version is None):
            raise ValueError("unknown_items='dlq' needs a semantic-ID store: no version is active (ugt:sid:active) "
                             "and none was given (--sid-version); run the item_semantic_ids job first")
        self.serde = serde
        self.job = job
        self.clock = clock
        self.rules = rules
        self.sids = sids
        self.tokens_schema_id = serde.registry.register(subject_for(tokens_topic), schema_text("tokenized_event"))
        self.dlq_schema_id = serde.registry.register(subject_for(dlq_topic), schema_text("dead_letter"))
        self.tokens_schema = load_schema("tokenized_event")
        self.dlq_schema = load_schema("dead_letter")
        self._tokens_header = HEADER.pack(MAGIC, self.tokens_schema_id)
        self._dlq_header = HEADER.pack(MAGIC, self.dlq_schema_id)
        self._encode_tokens = compile_encoder(self.tokens_schema)
        self._encode_dlq = compile_encoder(self.dlq_schema)
        self._decoders: dict[int, tuple[Any, Decoder | None]] = {}
        self._unknown_schemas: dict[int, float] = {}

    def _decoder(self, schema_id: int) -> tuple[Any, Decoder | None]:
        found = self._decoders.get(schema_id)
        if found is not None:
            return found
        retry_at = self._unknown_schemas.get(schema_id)
        if retry_at is not None and self.clock() < retry_at:
            raise DeadLetterError("UNKNOWN_SCHEMA", f"schema id {schema_id} is not in the registry")
        schema = self.serde.registry.schema_by_id(schema_id)  # RegistryError (outage) propagates
        if schema is None:
            if len(self._unknown_schemas) > 10_000:
                self._unknown_schemas.clear()
            self._unknown_schemas[schema_id] = self.clock() + self.UNKNOWN_SCHEMA_RETRY_S
            raise DeadLetterError("UNKNOWN_SCHEMA", f"schema id {schema_id} is not in the registry")
        found = (schema, compile_decoder(schema))
        self._decoders[schema_id] = found
        return found

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """Wire-format bytes -> the record as written; DeadLetterError with the serde reason codes."""
        if data is None:
            raise DeadLetterError("BAD_MAGIC", "record has no value (null)")
        size = len(data)
        if size > self.rules.max_record_bytes:
            raise DeadLetterError("OVERSIZED", f"record is {size} bytes, limit {self.rules.max_record_bytes}")
        if size < 5:
            raise DeadLetterError("BAD_MAGIC", f"record is {size} bytes, shorter than the 5-byte header")
        if data[0] != MAGIC:
            raise DeadLetterError("BAD_MAGIC", f"magic byte is {data[0]}, expected 0 (Confluent wire format)")
        schema_id = int.from_bytes(data[1:5], "big")
        schema, decode = self._decoder(schema_id)
        if decode is not None:
            try:
                return decode(data, 5)
            except DecodeFailed:
                pass  # let fastavro name the error (or read what the compiled decoder could not)
        try:
            return decode_body(schema, bytes(data[5:]))
        except SerdeError as exc:
            raise DeadLetterError(exc.reason_code, exc.reason) from exc

    def tokenize(self, data: bytes | None, now_ms: int) -> TokenizedEvent:
        """Bytes -> TokenizedEvent with the item's semantic IDs, or DeadLetterError."""
        record = self.decode(data)
        sids, levels = self.sids, None
        if sids is not None:
            item = record.get("item_id")
            levels = sids.get(item) if item.__class__ is str else None  # a bad item_id fails in tokenize_event
        try:
            if levels is None:
                event = tokenize_event(record)
            else:
                event = tokenize_event(record, semantic_ids=levels, sid_version=sids.version or "")
        except TokenizeError as exc:
            raise DeadLetterError(exc.reason_code, exc.reason) from exc
        check_event_time(event, now_ms, self.rules)
        if sids is not None and levels is None and self.rules.unknown_items == "dlq":
            raise DeadLetterError(
                "UNKNOWN_ITEM", f"item {event.item_id!r} has no semantic ID in {item_key(sids.version)}")
        return event

    def process(self, data: bytes | None, topic: str, partition: int, offset: int) -> Output:
        now_ms = int(self.clock() * 1000)
        try:
            event = self.tokenize(data, now_ms)
        except DeadLetterError as exc:
            return self.dead_letter(data, topic, partition, offset, exc.reason_code, exc.reason, now_ms)
        except (RegistryError, RedisError):
            # the registry or the semantic-ID store is down (e.g. a Redis Cluster failover): not the record's fault.
            # Fail the task, so the restore from the checkpoint tokenizes it again (the cluster-profile drill once
            # found 15 good events dead-lettered as PROCESSING_ERROR during a Redis master's failover)
            raise
        except Exception as exc:  # the record made the decoder or tokenizer fail in a way nobody named yet
            reason = f"{exc.__class__.__name__}: {exc}"
            return self.dead_letter(data, topic, partition, offset, "PROCESSING_ERROR", reason, now_ms)
        value = self._tokens_header + self._encode_tokens(event.to_record())
        return Output(key=event.user_id.encode(), value=value, event=event)

    def dead_letter(
        self, data: bytes | None, topic: str, partition: int, offset: int, code: str, reason: str, now_ms: int
    ) -> Output:
        record = dead_letter_record(data, topic, partition, offset, code, reason, self.job, now_ms)
        value = self._dlq_header + self._encode_dlq(record)
        return Output(key=dead_letter_key(topic, partition, offset), value=value, dead=code)
