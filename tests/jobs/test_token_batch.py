"""user_state's batch decode (jobs/token_batch.py) against the per-record path it replaces: the same events, the same
dead letters (reason code and text), for good records, every malformed kind and writer schemas that differ."""

from __future__ import annotations

import json
import random

import pytest
from job_events import make_event

from contracts.tokenizer import TokenizedEvent, tokenize_event
from jobs.token_batch import TokenBatchDecoder, decode_keyed, token_projection
from jobs.user_state_batch import pack_records
from streams.avro_decoder import REQUIRED, compile_decoder, compile_projection
from streams.serde import AvroSerde, SerdeError, encode_with_id, schema_text

TOKENS = json.loads(schema_text("tokenized_event"))


def variant(subject_schema: dict, serde: AvroSerde, subject: str, record: dict) -> bytes:
    """record written with another writer schema, registered under its own subject."""
    text = json.dumps(subject_schema)
    schema_id = serde.registry.register(subject, text)
    return encode_with_id(schema_id, serde.registry.schema_by_id(schema_id), record)


def tokens_schema(drop: str | None = None, retype: dict | None = None, extra: list | None = None) -> dict:
    schema = json.loads(json.dumps(TOKENS))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != drop] + (extra or [])
    for f in schema["fields"]:
        if retype and f["name"] in retype:
            f["type"] = retype[f["name"]]
    return schema


def per_record(serde: AvroSerde, value: bytes | None, key: bytes | None):
    try:
        return decode_keyed(serde, value, key), None
    except SerdeError as exc:
        return None, (exc.reason_code, exc.reason)


def assert_same_as_per_record(serde: AvroSerde, records: list[tuple[bytes | None, int, int]], key: bytes | None):
    decoder = TokenBatchDecoder(serde)
    decoded = decoder.decode(pack_records(records), key)
    assert [(r[2], r[3], r[4]) for r in decoded] == records
    for (event, error, value, _, _) in decoded:
        expected, expected_error = per_record(serde, value, key)
        assert (event, None if error is None else (error.reason_code, error.reason)) == (expected, expected_error)
        if event is not None:  # the same values of the same types (tuples stay tuples, ints stay ints)
            assert [type(getattr(event, f)) for f in TokenizedEvent.__dataclass_fields__] == \
                [type(getattr(expected, f)) for f in TokenizedEvent.__dataclass_fields__]
            assert hash(event) == hash(expected) and event.__dict__ == expected.__dict__
    return decoded, decoder


def test_good_records_decode_as_the_per_record_path(serde: AvroSerde) -> None:
    rng = random.Random(7)
    events = [tokenize_event(make_event(i, user="u1", context={"device": rng.choice(["web", "tv"])},
                                        duration_s=rng.choice([None, 12.5]))) for i in range(40)]
    records = [(serde.encode("tb.tokens-value", "tokenized_event", e.to_record()), 0, i) for i, e in enumerate(events)]
    decoded, decoder = assert_same_as_per_record(serde, records, b"u1")
    assert [r[0] for r in decoded] == events
    assert list(decoder.projections.values()) != [None]  # the fast path decoded them


def test_every_malformed_kind_gets_the_per_record_dead_letter(serde: AvroSerde) -> None:
    good = tokenize_event(make_event(1, user="u1"))
    value = serde.encode("tb.tokens-value", "tokenized_event", good.to_record())
    other_user = serde.encode("tb.tokens-value", "tokenized_event", tokenize_event(make_event(2, user="u2")).to_record())
    raw_event = serde.encode("tb.raw-value", "user_event", make_event(3, user="u1"))
    records = [
        (value, 0, 1), (None, 0, 2), (b"\x00\x00", 0, 3), (b"\x01" + value[1:], 0, 4),  # null, short, bad magic
        (value[:1] + (99999).to_bytes(4, "big") + value[5:], 0, 5),  # unknown schema id
        (value[:-3], 0, 6), (value + b"\x00\x00", 0, 7), (value[:5] + b"\xff" * 12, 0, 8),  # cut, trailing, garbage
        (other_user, 0, 9), (raw_event, 0, 10), (b"\x00" * (1 << 20) + b"\x00", 0, 11), (value, 0, 12),
    ]
    decoded, _ = assert_same_as_per_record(serde, records, b"u1")
    codes = [r[1].reason_code if r[1] else "ok" for r in decoded]
    assert codes[0] == codes[-1] == "ok" and {"BAD_MAGIC", "UNKNOWN_SCHEMA", "KEY_MISMATCH", "OVERSIZED"} <= set(codes)
    assert_same_as_per_record(serde, records[:1], None)  # no record key: KEY_MISMATCH
    assert_same_as_per_record(serde, records[:1], b"\xffu1")  # key bytes that are not UTF-8


@pytest.mark.parametrize("case", ["no-weekday", "extra-field", "event-time-string", "no-event-time",
                                  "context-nullable", "reordered"])
def test_other_writer_schemas_decode_as_the_per_record_path(serde: AvroSerde, case: str) -> None:
    event = tokenize_event(make_event(5, user="u1"))
    record = event.to_record()
    schema = {
        "no-weekday": lambda: tokens_schema(drop="weekday_token"),
        "extra-field": lambda: tokens_schema(extra=[{"name": "newer", "type": {"type": "array", "items": "string"},
                                                     "default": []}]),
        "event-time-string": lambda: tokens_schema(retype={"event_time": "string"}),
        "no-event-time": lambda: tokens_schema(drop="event_time"),
        "context-nullable": lambda: tokens_schema(retype={"context_tokens": ["null", {"type": "array",
                                                                                      "items": "long"}]}),
        "reordered": lambda: {**TOKENS, "fields": list(reversed(TOKENS["fields"]))},
    }[case]()
    record = {**record, "newer": ["x"], "event_time": str(record["event_time"])} if case == "event-time-string" \
        else {**record, "newer": ["x"]}
    values = [variant(schema, serde, f"tb.{case}-value", record),
              variant(schema, serde, f"tb.{case}-value", {**record, "context_tokens": None})
              if case == "context-nullable" else None]
    decoded, decoder = assert_same_as_per_record(serde, [(v, 0, i) for i, v in enumerate(values)], b"u1")
    fast = case in ("no-weekday", "extra-field", "reordered")
    assert [p is not None for p in decoder.projections.values()] == [fast]
    if fast:
        assert decoded[0][0] is not None and decoded[0][0].item_id == event.item_id


def test_projection_is_the_whole_decoders_fields_with_defaults_and_tuples() -> None:
    from streams.serde import load_schema

    writer = load_schema("tokenized_event")
    body = encode_with_id(1, writer, tokenize_event(make_event(9)).to_record())[5:]
    whole = compile_decoder(writer)(body, 0)
    fields = {"item_id": REQUIRED, "context_tokens": (), "absent": 7, "user_id": REQUIRED}
    projected = compile_projection(writer, fields, frozenset({"context_tokens"}))(body, 0)
    assert projected == {"item_id": whole["item_id"], "context_tokens": tuple(whole["context_tokens"]),
                         "absent": 7, "user_id": whole["user_id"]}
    assert compile_projection(writer, {"missing": REQUIRED}) is None
    assert token_projection({"type": "record", "name": "X", "fields": [{"name": "event_time", "type": "long"}]}) \
        is None  # user_id etc. are required
