"""tokenize job logic without Flink: every kind of malformed record gets its reason code and a dead letter."""

from __future__ import annotations

import math
import struct

import pytest
from job_events import make_event, user_event_variant

from contracts.limits import MAX_ID_CHARS
from contracts.tokenizer import TokenizedEvent, tokenize_event
from jobs.dead_letters import dead_letter_key
from jobs.tokenize_logic import EventTokenizer
from streams.serde import (
    MAX_RECORD_BYTES,
    AvroSerde,
    RegistryError,
    SchemaRegistryClient,
    decode_body,
    encode_with_id,
    load_schema,
    split_header,
)

RAW, TOKENS, DLQ = "t.raw", "t.tokens", "t.dlq"
NOW_S = 1_700_000_000.0


@pytest.fixture()
def tokenizer(serde: AvroSerde) -> EventTokenizer:
    return EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S)


def encode_variant(serde: AvroSerde, subject: str, schema_json: str, record: dict) -> bytes:
    """Register a broken variant under its own subject (the registry would refuse it under the topic's)."""
    import json

    import fastavro

    schema_id = serde.registry.register(subject, schema_json)
    return encode_with_id(schema_id, fastavro.parse_schema(json.loads(schema_json)), record)


def dead(tokenizer: EventTokenizer, data: bytes | None, offset: int = 7):
    out = tokenizer.process(data, RAW, 2, offset)
    assert out.dead is not None, "expected a dead letter"
    schema_id, body = split_header(out.value[:5])[0], out.value[5:]  # may exceed the decoder's size limit
    assert schema_id == tokenizer.dlq_schema_id
    letter = decode_body(load_schema("dead_letter"), body)
    assert out.key == dead_letter_key(RAW, 2, offset)
    assert (letter["topic"], letter["partition"], letter["offset"], letter["job"]) == (RAW, 2, offset, "tokenize")
    assert letter["original"] == (data or b"")
    assert letter["reason_code"] == out.dead and letter["reason"]
    assert int(letter["failed_at"].timestamp()) == int(NOW_S)
    return out.dead, letter["reason"]


def test_valid_event_becomes_tokens(tokenizer: EventTokenizer, serde: AvroSerde):
    event = make_event(3, user="alice")
    out = tokenizer.process(serde.encode(f"{RAW}-value", "user_event", event), RAW, 0, 1)
    assert out.dead is None and out.key == b"alice"
    decoded = serde.decode(out.value)
    assert decoded.schema_name == "ugt.events.TokenizedEvent"
    assert TokenizedEvent.from_record(decoded.record) == tokenize_event(event)


@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"garbage that is not avro", b"\x01\x00\x00\x00\x01abc", None])
def test_bad_bytes_are_bad_magic(tokenizer: EventTokenizer, data):
    assert dead(tokenizer, data)[0] == "BAD_MAGIC"


def test_unknown_schema_id(tokenizer: EventTokenizer, serde: AvroSerde):
    body = serde.encode(f"{RAW}-value", "user_event", make_event(1))[5:]
    code, reason = dead(tokenizer, struct.pack(">bI", 0, 987_654) + body)
    assert code == "UNKNOWN_SCHEMA" and "987654" in reason


def test_truncated_body_is_decode_error(tokenizer: EventTokenizer, serde: AvroSerde):
    data = serde.encode(f"{RAW}-value", "user_event", make_event(1))
    assert dead(tokenizer, data[: len(data) - 6])[0] == "DECODE_ERROR"
    assert dead(tokenizer, data + b"\x02\x04")[0] == "DECODE_ERROR"  # trailing bytes


def test_oversized(tokenizer: EventTokenizer):
    assert dead(tokenizer, b"\x00" * (MAX_RECORD_BYTES + 1))[0] == "OVERSIZED"


def test_missing_field(tokenizer: EventTokenizer, serde: AvroSerde):
    event = make_event(1)
    del event["item_id"]
    code, reason = dead(tokenizer, encode_variant(serde, "ugt-test-bad-value", user_event_variant(drop="item_id"), event))
    assert code == "MISSING_FIELD" and "item_id" in reason


def test_wrong_type(tokenizer: EventTokenizer, serde: AvroSerde):
    event = make_event(1, event_time="2020-01-01T00:00:00Z")
    data = encode_variant(serde, "ugt-test-bad-type-value", user_event_variant(retype={"event_time": "string"}), event)
    code, reason = dead(tokenizer, data)
    assert code == "WRONG_TYPE" and "event_time" in reason


def test_empty_id_is_bad_value(tokenizer: EventTokenizer, serde: AvroSerde):
    data = serde.encode(f"{RAW}-value", "user_event", make_event(1, user=""))
    assert dead(tokenizer, data)[0] == "BAD_VALUE"


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"rating": math.nan}, "field 'rating' must be a finite float, got nan"),
        ({"rating": math.inf}, "field 'rating' must be a finite float, got inf"),
        ({"rating": -math.inf}, "field 'rating' must be a finite float, got -inf"),
        ({"duration_s": math.nan}, "field 'duration_s' must be a finite float, got nan"),
        ({"duration_s": math.inf}, "field 'duration_s' must be a finite float, got inf"),
        ({"duration_s": -math.inf}, "field 'duration_s' must be a finite float, got -inf"),
        ({"user": "u" * (MAX_ID_CHARS + 1)}, f"field 'user_id' is {MAX_ID_CHARS + 1} characters long, over the "
                                             f"{MAX_ID_CHARS} that /recommend accepts"),
        ({"item_id": "i" * (MAX_ID_CHARS + 1)}, f"field 'item_id' is {MAX_ID_CHARS + 1} characters long, over the "
                                                f"{MAX_ID_CHARS} that /recommend accepts"),
    ],
)
def test_non_finite_numbers_and_overlong_ids_are_bad_values(tokenizer: EventTokenizer, serde: AvroSerde, over, reason):
    """Not PROCESSING_ERROR with a Python message: a reason a producer can act on, on both paths."""
    from jobs.dead_letters import DeadLetterError
    from jobs.tokenize_logic import decode_and_tokenize

    data = serde.encode(f"{RAW}-value", "user_event", make_event(1, **over))
    code, text = dead(tokenizer, data)
    assert code == "BAD_VALUE" and text.startswith(reason)
    with pytest.raises(DeadLetterError) as info:
        decode_and_tokenize(serde, data, int(NOW_S * 1000))
    assert (info.value.reason_code, info.value.reason) == (code, text)


def test_ids_of_exactly_the_bound_pass(tokenizer: EventTokenizer, serde: AvroSerde):
    event = make_event(1, user="u" * MAX_ID_CHARS, item_id="i" * MAX_ID_CHARS)
    out = tokenizer.process(serde.encode(f"{RAW}-value", "user_event", event), RAW, 0, 1)
    assert out.dead is None and out.event == tokenize_event(event)


def test_far_future(tokenizer: EventTokenizer, serde: AvroSerde):
    data = serde.encode(f"{RAW}-value", "user_event", make_event(1, t_ms=int(NOW_S * 1000) + 2 * 86_400_000))
    assert dead(tokenizer, data)[0] == "FAR_FUTURE"
    ok = serde.encode(f"{RAW}-value", "user_event", make_event(1, t_ms=int(NOW_S * 1000) + 3_600_000))
    assert tokenizer.process(ok, RAW, 0, 0).dead is None


def test_registry_outage_is_not_the_records_fault():
    # nothing listens on port 9: the job must fail (and be restarted), not dead-letter good records
    with pytest.raises(RegistryError):
        EventTokenizer(AvroSerde(SchemaRegistryClient("http://127.0.0.1:9", timeout_s=0.5)), TOKENS, DLQ)


# -- rules (the job's options) and the semantic-ID store --

def sid_store(items: dict[str, str], version: str = "v1"):
    from test_sid_cache import FakeRedis

    from contracts.redis_keys import ACTIVE_KEY
    from jobs.sid_cache import SemanticIdCache

    r = FakeRedis()
    r.strings[ACTIVE_KEY] = version.encode()
    for item, code in items.items():
        r.put(version, item, code)
    return SemanticIdCache(r)


def test_too_old_uses_the_configurable_floor(serde: AvroSerde):
    from jobs.tokenize_logic import Rules, parse_time_floor

    old = serde.encode(f"{RAW}-value", "user_event", make_event(1, t_ms=parse_time_floor("1989-12-31")))
    ml100k = serde.encode(f"{RAW}-value", "user_event", make_event(2, t_ms=874_724_710_000))  # 1997-09-20
    default = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S)
    assert dead(default, old)[0] == "TOO_OLD"
    assert default.process(ml100k, RAW, 0, 0).dead is None
    strict = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S,
                            rules=Rules(min_event_time_ms=parse_time_floor("2000-01-01")))
    code, reason = dead(strict, ml100k)
    assert code == "TOO_OLD" and "946684800000" in reason


def test_future_skew_and_size_limit_are_configurable(serde: AvroSerde):
    from jobs.tokenize_logic import Rules

    tokenizer = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S,
                               rules=Rules(max_future_skew_ms=60_000, max_record_bytes=200))
    soon = serde.encode(f"{RAW}-value", "user_event", make_event(1, t_ms=int(NOW_S * 1000) + 120_000))
    assert dead(tokenizer, soon)[0] == "FAR_FUTURE"
    big = serde.encode(f"{RAW}-value", "user_event", make_event(2, context={"page": "x" * 300}))
    code, reason = dead(tokenizer, big)
    assert code == "OVERSIZED" and "limit 200" in reason


def test_tokens_carry_semantic_ids_and_unknown_items_pass_or_die(serde: AvroSerde):
    from jobs.tokenize_logic import Rules

    sids = sid_store({"item1": "4-2-0", "item2": "4-3-1"})
    known = serde.encode(f"{RAW}-value", "user_event", make_event(1))  # item1
    unknown = serde.encode(f"{RAW}-value", "user_event", make_event(5))  # item5
    passing = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S, sids=sids)
    out = passing.process(known, RAW, 0, 1)
    token = TokenizedEvent.from_record(serde.decode(out.value).record)
    assert token.semantic_ids == (4, 2, 0) and token.sid_version == "v1"
    assert token == tokenize_event(make_event(1), semantic_ids=(4, 2, 0), sid_version="v1") == out.event
    token = TokenizedEvent.from_record(serde.decode(passing.process(unknown, RAW, 0, 2).value).record)
    assert token.semantic_ids == () and token.sid_version == ""
    strict = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S, sids=sids, rules=Rules(unknown_items="dlq"))
    code, reason = dead(strict, unknown)
    assert code == "UNKNOWN_ITEM" and "item5" in reason and "ugt:sid:item:{v1}" in reason
    assert strict.process(known, RAW, 0, 3).dead is None


def test_a_semantic_id_store_outage_fails_instead_of_dead_lettering(serde: AvroSerde):
    """A Redis master down mid-failover (ConnectionError on the lookup) is not the record's fault: the task fails
    and its restore tokenizes the record again; a dead letter would lose a good event for good."""
    import redis

    sids = sid_store({"item1": "4-2-0"})
    def refused(key, fields):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6380. Connection refused.")

    sids.client.hmget = refused
    tokenizer = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S, sids=sids)
    with pytest.raises(redis.ConnectionError):
        tokenizer.process(serde.encode(f"{RAW}-value", "user_event", make_event(5)), RAW, 0, 1)


def test_unknown_items_dlq_without_a_store_fails_at_start(serde: AvroSerde):
    from test_sid_cache import FakeRedis

    from jobs.sid_cache import SemanticIdCache
    from jobs.tokenize_logic import Rules

    with pytest.raises(ValueError, match="no version is active"):
        EventTokenizer(serde, TOKENS, DLQ, rules=Rules(unknown_items="dlq"), sids=SemanticIdCache(FakeRedis()))
    with pytest.raises(ValueError, match="unknown_items"):
        Rules(unknown_items="drop")


def test_fast_path_equals_the_fastavro_reference(serde: AvroSerde):
    """The compiled decoder/encoder path gives the same bytes as decode_and_tokenize + fastavro."""
    from jobs.tokenize_logic import decode_and_tokenize
    from streams.serde import encode_with_id

    tokenizer = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S)
    for i, event in enumerate([make_event(1), make_event(2, rating=None, context={}),
                               make_event(3, duration_s=12.5, action="VIEW", context={"b": "2", "a": "1"})]):
        data = serde.encode(f"{RAW}-value", "user_event", event)
        reference = decode_and_tokenize(serde, data, int(NOW_S * 1000))
        want = encode_with_id(tokenizer.tokens_schema_id, tokenizer.tokens_schema, reference.to_record())
        assert tokenizer.process(data, RAW, 0, i).value == want


def test_unknown_schema_ids_are_not_looked_up_again_and_again(serde: AvroSerde):
    calls = []
    tokenizer = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_S)
    original = serde.registry.schema_by_id
    serde.registry.schema_by_id = lambda i: calls.append(i) or original(i)
    for offset in range(5):
        assert dead(tokenizer, struct.pack(">bI", 0, 424_242) + b"\x02", offset)[0] == "UNKNOWN_SCHEMA"
    assert calls == [424_242]
