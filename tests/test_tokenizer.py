"""The shared tokenizer: tokens, reason codes for bad events, determinism."""

from __future__ import annotations

import datetime as dt

import pytest

from contracts.tokenizer import (
    ACTION_TOKEN,
    TokenizedEvent,
    TokenizeError,
    duration_token,
    rating_token,
    stable_hash64,
    time_gap_bucket,
    tokenize_event,
)


def make_event(**overrides):
    event = {
        "event_id": "ml-1m:7",
        "user_id": "42",
        "item_id": "1193",
        "action": "RATE",
        "event_time": 978300760000,
        "rating": 5.0,
        "duration_s": None,
        "domain": "movie",
        "context": {"device": "mobile", "page": "home"},
    }
    event.update(overrides)
    return event


def test_tokens_of_a_rating_event():
    tokens = tokenize_event(make_event(), semantic_ids=[3, 17, 0])
    assert tokens.action_token == ACTION_TOKEN["RATE"] == 2
    assert tokens.rating_token == 10  # 5 stars -> top half-star bucket
    assert tokens.duration_token == 0
    assert tokens.hour_token == (978300760000 // 3_600_000) % 24 == 22
    assert tokens.semantic_ids == (3, 17, 0)
    # context tokens are sorted by key and stable across processes
    assert tokens.context_tokens == (stable_hash64("device=mobile"), stable_hash64("page=home"))


def test_datetime_event_time_from_avro_equals_epoch_ms():
    aware = dt.datetime.fromtimestamp(978300760, tz=dt.timezone.utc)
    assert tokenize_event(make_event(event_time=aware)) == tokenize_event(make_event())


def test_record_round_trip():
    tokens = tokenize_event(make_event())
    assert TokenizedEvent.from_record(tokens.to_record()) == tokens


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"item_id": None}, "MISSING_FIELD"),
        ({"event_time": "2020-01-01"}, "WRONG_TYPE"),
        ({"user_id": 42}, "WRONG_TYPE"),
        ({"event_time": True}, "WRONG_TYPE"),
        ({"rating": "five"}, "WRONG_TYPE"),
        ({"context": ["a"]}, "WRONG_TYPE"),
        ({"user_id": ""}, "BAD_VALUE"),
    ],
)
def test_bad_events_raise_reason_codes(overrides, code):
    with pytest.raises(TokenizeError) as info:
        tokenize_event(make_event(**overrides))
    assert info.value.reason_code == code


def test_missing_key_is_missing_field():
    event = make_event()
    del event["user_id"]
    with pytest.raises(TokenizeError, match="MISSING_FIELD: field 'user_id'"):
        tokenize_event(event)


def test_buckets_are_monotone_and_bounded():
    assert rating_token(None) == 0 and rating_token(0.5) == 1 and rating_token(4.5) == 9
    assert duration_token(None) == 0 and duration_token(0) == 1 and duration_token(1e12) == 23
    gaps = [time_gap_bucket(s) for s in (0, 1, 60, 3600, 86400, 1e9)]
    assert gaps == sorted(gaps) and gaps[0] == 0 and gaps[-1] <= 63


def test_unknown_action_maps_to_unknown_token():
    assert tokenize_event(make_event(action="TELEPORT")).action_token == ACTION_TOKEN["UNKNOWN"]


def test_to_record_has_every_field_of_the_dataclass_and_the_schema():
    import dataclasses
    import json

    from streams.serde import schema_text

    record = tokenize_event(make_event(), semantic_ids=[1, 2], sid_version="v9").to_record()
    assert set(record) == {f.name for f in dataclasses.fields(TokenizedEvent)}
    assert set(record) == {f["name"] for f in json.loads(schema_text("tokenized_event"))["fields"]}
