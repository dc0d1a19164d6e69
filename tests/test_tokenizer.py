"""The shared tokenizer: tokens, reason codes for bad events, determinism."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from contracts.limits import MAX_ID_CHARS
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


@pytest.mark.parametrize("field", ["rating", "duration_s"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400], ids=["nan", "inf", "-inf", "1e400"])
def test_a_number_that_is_not_a_finite_float_is_a_bad_value(field, value):
    # NaN once reached math.ceil and died as "cannot convert float NaN to integer" (a PROCESSING_ERROR)
    with pytest.raises(TokenizeError, match=f"field '{field}' must be a finite float, got ") as info:
        tokenize_event(make_event(**{field: value}))
    assert info.value.reason_code == "BAD_VALUE"


def test_huge_finite_numbers_land_in_the_top_bucket():
    tokens = tokenize_event(make_event(rating=1e308, duration_s=1e308))  # 2 * 1e308 overflows to inf
    assert (tokens.rating_token, tokens.duration_token) == (10, 23)
    assert tokenize_event(make_event(rating=-1e308)).rating_token == 1


def test_the_raw_duration_and_the_items_length_are_kept_for_watch_metrics():
    """Tokens keep duration_s whole (the bucket loses it) and the item's length from the context when it is a
    positive number; a bad context value is left out, never a dead letter; both fit an Avro float."""
    from streams.avro_codegen import compile_encoder
    from streams.serde import load_schema

    tokens = tokenize_event(make_event(duration_s=5400.5, context={"item_length_s": "6000", "device": "tv"}))
    assert (tokens.duration_s, tokens.item_length_s) == (5400.5, 6000.0)
    assert tokens.duration_token == duration_token(5400.5)
    for bad in ("-5", "0", "long", "nan", "inf", "1e300"):
        assert tokenize_event(make_event(context={"item_length_s": bad})).item_length_s is None, bad
    assert tokenize_event(make_event(duration_s=-3.0)).duration_s is None
    huge = tokenize_event(make_event(duration_s=1e308))
    assert huge.duration_s == 3.4028234663852886e38
    compile_encoder(load_schema("tokenized_event"))(huge.to_record())  # no OverflowError packing a float


@pytest.mark.parametrize("field", ["user_id", "item_id"])
def test_ids_longer_than_recommend_accepts_are_bad_values(field):
    assert tokenize_event(make_event(**{field: "x" * MAX_ID_CHARS})).to_record()[field] == "x" * MAX_ID_CHARS
    with pytest.raises(TokenizeError, match=f"field '{field}' is {MAX_ID_CHARS + 1} characters long") as info:
        tokenize_event(make_event(**{field: "x" * (MAX_ID_CHARS + 1)}))
    assert info.value.reason_code == "BAD_VALUE"
    assert str(MAX_ID_CHARS) in info.value.reason


def test_the_id_bound_is_the_one_recommend_enforces():
    from pydantic import ValidationError

    from serving.http_models import RecommendRequest

    RecommendRequest(user_id="u" * MAX_ID_CHARS, context=["i" * MAX_ID_CHARS], exclude=["i" * MAX_ID_CHARS])
    for bad in ({"user_id": "u" * (MAX_ID_CHARS + 1)}, {"user_id": "u", "context": ["i" * (MAX_ID_CHARS + 1)]},
                {"user_id": "u", "exclude": ["i" * (MAX_ID_CHARS + 1)]}):
        with pytest.raises(ValidationError):
            RecommendRequest(**bad)


@pytest.mark.parametrize("domain", ["a b", "-movie", "movie/eu", "x" * 65, "ca\u00f1on"])
def test_a_domain_recommend_could_never_name_is_bad_value(domain):
    with pytest.raises(TokenizeError, match="field 'domain' must be") as info:
        tokenize_event(make_event(domain=domain))
    assert info.value.reason_code == "BAD_VALUE"


@pytest.mark.parametrize("domain", ["movie", "shop-eu.v2", "x" * 64, ""])
def test_domains_recommend_accepts_pass_and_empty_means_movie(domain):
    assert tokenize_event(make_event(domain=domain)).domain == (domain or "movie")


def test_the_domain_rule_is_the_one_recommend_enforces():
    from pydantic import ValidationError

    from serving.http_models import RecommendRequest

    RecommendRequest(user_id="u", domain="shop-eu.v2")
    for bad in ("a b", "x" * 65):
        with pytest.raises(ValidationError):
            RecommendRequest(user_id="u", domain=bad)


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
