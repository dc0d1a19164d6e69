"""user_state's token records decoded a micro-batch at a time: one pass over the batch, no record dict per event.

The per-record path (jobs.user_state_logic.decode_token_event) decodes each record into the writer's whole dict,
copies it in TokenizedEvent.from_record and builds the frozen dataclass field by field: ~10 µs of the ~23 µs that
user_state's thread spent per event batched (docs/JOBS.md). :class:`TokenBatchDecoder` reads the batch
(jobs/user_state_batch.py format) once and decodes each value with a projection compiled per writer schema
(streams.avro_decoder.compile_projection) straight into the event's fields. Anything the fast path does not
cover exactly (no value, a bad header, an unknown or uncompilable schema, a body that does not decode, a key that
is not the user_id) goes through the per-record path, so every dead letter keeps its reason code and text.
tests/jobs/test_token_batch.py holds the two paths equal.
"""

from __future__ import annotations

from dataclasses import MISSING
from typing import Any

from contracts.tokenizer import TokenizedEvent
from jobs.user_state_batch import iter_records
from jobs.user_state_logic import decode_token_event
from streams.avro_decoder import REQUIRED, DecodeFailed, Decoder, compile_projection
from streams.serde import HEADER, MAGIC, MAX_RECORD_BYTES, AvroSerde, SerdeError

KEY_MISMATCH = "KEY_MISMATCH"  # an events.tokens record whose key is not its user_id
TUPLE_FIELDS = frozenset({"context_tokens", "semantic_ids"})  # TokenizedEvent.from_record makes them tuples
READER_FIELDS: dict[str, Any] = {
    name: REQUIRED if spec.default is MISSING else spec.default
    for name, spec in TokenizedEvent.__dataclass_fields__.items()
}
_NEW_EVENT = object.__new__

# one decoded record: (event, None, value, partition, offset) or (None, SerdeError, value, partition, offset)
TokenRecord = tuple[TokenizedEvent | None, SerdeError | None, bytes | None, int, int]


def check_key(event: TokenizedEvent, key: bytes | None) -> TokenizedEvent:
    """The event, or SerdeError KEY_MISMATCH when the record key is not its user_id."""
    if key is None or event.user_id != key.decode("utf-8", "replace"):
        raise SerdeError(KEY_MISMATCH, f"record key {key!r} is not the event's user_id {event.user_id!r}: "
                                       "events.tokens must be keyed by user_id (the tokenize job does)")
    return event


def decode_keyed(serde: AvroSerde, data: bytes | None, key: bytes | None) -> TokenizedEvent:
    """The per-record path: decode_token_event, then the key check; SerdeError with the dead letter's reason."""
    return check_key(decode_token_event(serde, data), key)


def _type_name(avro_type: Any) -> Any:
    return avro_type.get("type") if isinstance(avro_type, dict) else avro_type


def token_projection(writer_schema: dict[str, Any]) -> Decoder | None:
    """decode(body, 0) -> TokenizedEvent's fields for this writer schema, or None where from_record would do
    more than copy them (event_time not an Avro long/int, a tuple field not an array, a required field missing,
    a type the code generator leaves to fastavro)."""
    if writer_schema.get("type") != "record":
        return None
    types = {field["name"]: _type_name(field["type"]) for field in writer_schema["fields"]}
    if types.get("event_time") not in ("long", "int"):
        return None
    if any(name in types and types[name] != "array" for name in TUPLE_FIELDS):
        return None
    return compile_projection(writer_schema, READER_FIELDS, TUPLE_FIELDS)


class TokenBatchDecoder:
    """One key's micro-batch of events.tokens records -> TokenRecords in arrival order."""

    def __init__(self, serde: AvroSerde):
        self.serde = serde
        self.projections: dict[int, Decoder | None] = {}  # writer schema id -> its projection (None: per record)

    def _projection(self, schema_id: int) -> Decoder | None:
        if schema_id in self.projections:
            return self.projections[schema_id]
        schema = self.serde.registry.schema_by_id(schema_id)
        if schema is None:
            return None  # not cached: the per-record path says UNKNOWN_SCHEMA, and the id may be registered later
        projection = self.projections[schema_id] = token_projection(schema)
        return projection

    def _fast(self, value: bytes | None, key_text: str | None) -> TokenizedEvent | None:
        """The event when the fast path decodes it exactly; None sends the record the per-record way."""
        if value is None or not HEADER.size <= len(value) <= MAX_RECORD_BYTES:
            return None
        magic, schema_id = HEADER.unpack_from(value)
        projection = self._projection(schema_id) if magic == MAGIC else None
        if projection is None:
            return None
        try:
            fields = projection(value[HEADER.size:], 0)  # the body alone, as decode_raw reads it
        except DecodeFailed:
            return None
        if fields["user_id"] != key_text:
            return None
        event = _NEW_EVENT(TokenizedEvent)
        event.__dict__.update(fields)  # the frozen dataclass's fields, without its per-field __setattr__
        return event

    def decode(self, data: bytes, key: bytes | None) -> list[TokenRecord]:
        """The batch's records, each decoded and key-checked as decode_keyed would (the same events, the same
        SerdeErrors); RegistryError and a batch cut short (ValueError) propagate."""
        key_text = None if key is None else key.decode("utf-8", "replace")
        fast = self._fast
        out: list[TokenRecord] = []
        for value, partition, offset in iter_records(data):
            event = fast(value, key_text)
            if event is None:
                try:
                    event = decode_keyed(self.serde, value, key)
                except SerdeError as exc:
                    out.append((None, exc, value, partition, offset))
                    continue
            out.append((event, None, value, partition, offset))
        return out
