"""Direct reads of Feast's Redis layout, against bytes Feast 0.67 itself produced (captured golden values)."""

from pathlib import Path

import pytest

from models.user_state import FEATURE_NAMES
from serving.feast_redis import FeastRedisLayout, UnsupportedValue, decode_value, feature_field
from serving.state import BadState, UserStateView

REPO = Path(__file__).resolve().parents[2] / "feature_repo"

# feast.infra.online_stores.helpers._mmh3("user_recent_events:<feature>")
GOLDEN_FIELDS = {
    "recent_item_ids": b"q\x9b_\xea",
    "recent_action_tokens": b"\x10\xce\x13N",
    "recent_rating_tokens": b"S\xc5\x93\xdd",
    "recent_event_times": b"\x97\xec\xf9\xa4",
    "event_count": b"\x97\xd4D\x16",
    "last_event_time": b"k\xbav\xcf",
    "state_version": b"\xfeq\x8aR",
}


def test_field_names_match_feast():
    assert {name: feature_field("user_recent_events", name) for name in FEATURE_NAMES} == GOLDEN_FIELDS


def test_entity_key_matches_feast():
    # feast.infra.online_stores.helpers._redis_key("ugt", EntityKey(user_id="user-ü 42"), 3)
    expected = b"\x01\x00\x00\x00\x02\x00\x00\x00\x07\x00\x00\x00user_id\x02\x00\x00\x00\n\x00\x00\x00user-\xc3\xbc 42ugt"
    assert FeastRedisLayout("ugt").entity_key("user_id", "user-ü 42") == expected


def test_layout_from_the_repo():
    assert FeastRedisLayout.from_repo(REPO) == FeastRedisLayout("ugt", 3)


@pytest.mark.parametrize(
    "data, value",
    [
        (b"b\x08\n\x02i1\n\x02i2", ["i1", "i2"]),
        (b"b\t\n\x01a\n\x02\xc3\xbc\n\x00", ["a", "ü", ""]),
        (
            b"r\x16\n\x14\xfb\xff\xff\xff\xff\xff\xff\xff\xff\x01\x00\x80\x80\x80\x80\x80\x80\x80\x80@",
            [-5, 0, 2**62],
        ),
        (b"r\x00", []),
        (b" \x02", 2),
        (b" \xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", -1),
        (b"z\n\n\x08\x00\x00\x00\x00\x00\x00\xf8?", [1.5]),
        (b"", None),
        (None, None),
    ],
)
def test_decodes_feast_values(data, value):
    assert decode_value(data) == value


def test_refuses_types_it_does_not_decode():
    with pytest.raises(UnsupportedValue):
        decode_value(b"Z\x03\n\x01x")  # bytes_list_val


def test_state_view_unknown_and_malformed():
    assert UserStateView.from_features("u", {name: None for name in FEATURE_NAMES}) is None
    good = {
        "recent_item_ids": ["a"],
        "recent_action_tokens": [2],
        "recent_rating_tokens": [8],
        "recent_event_times": [5],
        "event_count": 1,
        "last_event_time": 5,
        "state_version": 1,
    }
    assert UserStateView.from_features("u", good).item_ids == ("a",)
    with pytest.raises(BadState, match="different lengths"):
        UserStateView.from_features("u", {**good, "recent_action_tokens": [2, 2]})
    with pytest.raises(BadState, match="malformed"):
        UserStateView.from_features("u", {**good, "event_count": "many"})
