"""streams/serde.py: wire-format round trips of every schema, and every SerdeError reason code."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import fastavro
import pytest

from streams.serde import (
    HEADER,
    MAX_RECORD_BYTES,
    AvroSerde,
    SerdeError,
    decode_body,
    encode_with_id,
    load_schema,
    schema_text,
    split_header,
    subject_for,
)

MS = 1_700_000_000_123
SAMPLES = {
    "user_event": {
        "event_id": "e-1", "user_id": "u-42", "item_id": "i-7", "action": "CLICK", "event_time": MS,
        "rating": 4.5, "duration_s": 12.25, "domain": "video", "context": {"device": "tv", "locale": "zh-CN"},
    },
    "item_event": {
        "item_id": "i-7", "domain": "movie", "title": "Toy Story 玩具总动员", "description": "toys",
        "categories": ["Animation", "Comedy"], "attributes": {"year": "1995"}, "updated_at": MS,
    },
    "tokenized_event": {
        "event_id": "e-1", "user_id": "u-42", "item_id": "i-7", "event_time": MS, "domain": "movie",
        "action_token": 3, "rating_token": 5, "duration_token": 0, "hour_token": 22,
        "context_tokens": [2**40, -5], "semantic_ids": [12, 7, 1], "tokenizer_version": 2,
        "weekday_token": 2, "sid_version": "sid-v1", "duration_s": 1234.5, "item_length_s": None,
    },
    "dead_letter": {
        "original": b"\x01\x02garbage", "topic": "events.raw", "partition": 3, "offset": 2**33,
        "reason_code": "BAD_MAGIC", "reason": "magic byte is 1", "job": "tokenize", "failed_at": MS,
    },
}


def as_written(record: dict) -> dict:
    """Decoded timestamp-millis fields come back as UTC datetimes; compare in milliseconds."""
    return {k: round(v.timestamp() * 1000) if isinstance(v, datetime) else v for k, v in record.items()}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_pure_round_trip(name: str) -> None:
    schema = load_schema(name)
    data = encode_with_id(77, schema, SAMPLES[name])
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == 77
    schema_id, body = split_header(data)
    assert schema_id == 77
    assert as_written(decode_body(schema, body)) == SAMPLES[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_registry_round_trip(serde: AvroSerde, name: str) -> None:
    data = serde.encode(subject_for(f"t.{name}"), name, SAMPLES[name])
    decoded = serde.decode(data)
    assert decoded.schema_name == load_schema(name)["name"]
    assert decoded.schema_id == int.from_bytes(data[1:5], "big")
    assert as_written(decoded.record) == SAMPLES[name]
    stamps = [v for v in decoded.record.values() if isinstance(v, datetime)]
    assert stamps and all(v.tzinfo == timezone.utc for v in stamps)


def v1_tokenized_schema() -> dict:
    """tokenized_event as tokenizer version 1 wrote it: no weekday_token, no sid_version."""
    schema = json.loads(schema_text("tokenized_event"))
    schema["fields"] = [f for f in schema["fields"]
                        if f["name"] not in ("weekday_token", "sid_version", "duration_s", "item_length_s")]
    return schema


def test_v1_tokenized_records_read_with_v2_defaults() -> None:
    newer = ("weekday_token", "sid_version", "duration_s", "item_length_s")
    old = {k: v for k, v in SAMPLES["tokenized_event"].items() if k not in newer}
    old["tokenizer_version"] = 1
    writer = fastavro.parse_schema(v1_tokenized_schema())
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, writer, old)
    buffer.seek(0)
    record = fastavro.schemaless_reader(buffer, writer, load_schema("tokenized_event"))
    assert as_written(record) == {**old, "weekday_token": 0, "sid_version": "", "duration_s": None,
                                  "item_length_s": None}


def test_v2_tokenized_schema_is_backward_compatible_in_registry(serde: AvroSerde) -> None:
    subject = "t.compat.tokens-value"
    serde.registry.register(subject, json.dumps(v1_tokenized_schema()))
    assert serde.registry.check_compatibility(subject, schema_text("tokenized_event"))
    broken = json.loads(schema_text("tokenized_event"))
    for field in broken["fields"]:
        if field["name"] == "weekday_token":
            del field["default"]
    assert not serde.registry.check_compatibility(subject, json.dumps(broken))


def test_same_schema_same_id_and_subject_naming(serde: AvroSerde, registry_url: str) -> None:
    a = serde.encode("events.raw-value", "user_event", SAMPLES["user_event"])
    b = serde.encode("events.raw-value", "user_event", SAMPLES["user_event"])
    assert a[:5] == b[:5]
    assert subject_for("events.raw") == "events.raw-value"
    # a second client (no cache) sees the same id for the same schema
    from streams.serde import SchemaRegistryClient

    fresh = AvroSerde(SchemaRegistryClient(registry_url))
    assert fresh.decode(a).schema_id == int.from_bytes(a[1:5], "big")


def test_bad_magic_null_and_short(serde: AvroSerde) -> None:
    good = encode_with_id(1, load_schema("user_event"), SAMPLES["user_event"])
    for data, fragment in [(b"\x01" + good[1:], "magic byte is 1"), (None, "null"), (b"\x00\x00", "shorter")]:
        with pytest.raises(SerdeError) as err:
            serde.decode(data)
        assert err.value.reason_code == "BAD_MAGIC" and fragment in err.value.reason


def test_unknown_schema(serde: AvroSerde) -> None:
    data = HEADER.pack(0, 424242) + b"\x02a"
    with pytest.raises(SerdeError) as err:
        serde.decode(data)
    assert err.value.reason_code == "UNKNOWN_SCHEMA" and "424242" in err.value.reason


def test_decode_error_truncated_and_trailing(serde: AvroSerde) -> None:
    data = serde.encode("t.err-value", "user_event", SAMPLES["user_event"])
    for bad, fragment in [(data[:-6], "does not match"), (data + b"\x00\x00", "trailing")]:
        with pytest.raises(SerdeError) as err:
            serde.decode(bad)
        assert err.value.reason_code == "DECODE_ERROR" and fragment in err.value.reason
    # an item record read as if it were a user event: wrong schema id for the body
    user_id = serde.registry.register("t.err-value", schema_text("user_event"))
    item_body = encode_with_id(user_id, load_schema("item_event"), SAMPLES["item_event"])
    with pytest.raises(SerdeError) as err:
        serde.decode(item_body)
    assert err.value.reason_code == "DECODE_ERROR"


def test_oversized(serde: AvroSerde) -> None:
    with pytest.raises(SerdeError) as err:
        serde.decode(b"\x00" * (MAX_RECORD_BYTES + 1))
    assert err.value.reason_code == "OVERSIZED"


def test_every_reason_code_is_tested() -> None:
    # SerdeError's docstring is the list of codes; each one has a test above.
    documented = {"BAD_MAGIC", "UNKNOWN_SCHEMA", "DECODE_ERROR", "OVERSIZED"}
    assert all(code in (SerdeError.__doc__ or "") for code in documented)
