"""Direct reads of Feast's Redis layout, against bytes Feast 0.67 itself produced (captured golden values)."""

from pathlib import Path

import pytest

from contracts.user_state_rule import FEATURE_NAMES
from infra.feast_store import FeastRedisLayout, feature_field
from serving.feast_redis import (
    UnsupportedValue,
    _Value,
    decode_appended,
    decode_typed,
    decode_value,
    encode_typed,
)
from serving.user_state_reader import BadState, RedisStateReader, UserStateView

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


def test_decode_typed_checks_the_stored_kind():
    assert decode_typed(b"b\x08\n\x02i1\n\x02i2", "string_list_val") == ("i1", "i2")
    assert decode_typed(b" \x02", "int64_val") == 2
    assert decode_typed(None, "int64_val") is None
    with pytest.raises(UnsupportedValue, match="stored as string_list_val, expected int64_list_val"):
        decode_typed(b"b\x08\n\x02i1\n\x02i2", "int64_list_val")


def _upb_typed(data: bytes, kind: str):
    """What the protobuf runtime reads from ``data``: (kind, value), the reference for the byte-level fast paths."""
    message = _Value()
    message.ParseFromString(data)
    which = message.WhichOneof("val")
    value = getattr(message, which) if which else None
    return which, tuple(value.val) if which and which.endswith("_list_val") else value


INT64S = [0, 1, 5, 127, 128, 300, 2**31, 2**62, 2**63 - 1, -1, -5, -(2**63), 978_307_200_000]


@pytest.mark.parametrize("values", [[], [0], [3, 7, 9], list(range(128)), [127, 128], [5, -1, 6],
                                    [978_307_200_000, 1], INT64S, [2**63 - 1] * 3])
def test_int64_list_fast_path_reads_what_protobuf_reads(values):
    data = encode_typed(values, "int64_list_val")
    assert decode_typed(data, "int64_list_val") == _upb_typed(data, "int64_list_val")[1] == tuple(values)


@pytest.mark.parametrize("value", INT64S)
def test_int64_fast_path_reads_what_protobuf_reads(value):
    data = encode_typed(value, "int64_val")
    assert decode_typed(data, "int64_val") == _upb_typed(data, "int64_val")[1] == value


def test_fast_paths_leave_other_layouts_to_protobuf():
    unpacked = b"r\x06\x08\x03\x08\x07\x08\x09"  # Int64List.val unpacked: every value its own field, still valid
    assert _upb_typed(unpacked, "int64_list_val") == ("int64_list_val", (3, 7, 9))
    assert decode_typed(unpacked, "int64_list_val") == (3, 7, 9)
    assert decode_typed(b" \x02\x28\x01", "int64_val") == 2  # an unknown field after the value: protobuf skips it
    with pytest.raises(UnsupportedValue, match="stored as int32_val, expected int64_val"):
        decode_typed(encode_typed(4, "int32_val"), "int64_val")
    with pytest.raises(UnsupportedValue, match="stored as int32_list_val, expected int64_list_val"):
        decode_typed(encode_typed([1, 2], "int32_list_val"), "int64_list_val")


class HashClient:
    """hmget over one stored hash (bytes as Feast wrote them)."""

    def __init__(self, hashes):
        self.hashes = hashes

    def hmget(self, key, fields):
        stored = self.hashes.get(key, {})
        return [stored.get(f) for f in fields]


STORED_U1 = {  # user "u1": items i1, i2 (captured from a Feast push)
    GOLDEN_FIELDS["recent_item_ids"]: b"b\x08\n\x02i1\n\x02i2",
    GOLDEN_FIELDS["recent_action_tokens"]: b"r\x04\n\x02\x02\x02",
    GOLDEN_FIELDS["recent_rating_tokens"]: b"r\x04\n\x02\x08\n",
    GOLDEN_FIELDS["recent_event_times"]: b"r\x06\n\x04\xe8\x07\xd0\x0f",
    GOLDEN_FIELDS["event_count"]: b" \x02",
    GOLDEN_FIELDS["last_event_time"]: b" \xd0\x0f",
    GOLDEN_FIELDS["state_version"]: b" \x01",
}


def reader_over(stored):
    layout = FeastRedisLayout("ugt")
    return RedisStateReader(
        HashClient({layout.entity_key("user_id", "u1"): stored}), layout, "user_recent_events"
    )


def test_redis_reader_builds_the_view():
    state = reader_over(STORED_U1).read("u1")
    assert state == UserStateView("u1", ("i1", "i2"), (2, 2), (8, 10), (1000, 2000), 2, 2000, 1)
    assert reader_over(STORED_U1).read("someone-else") is None


def test_redis_reader_refuses_bad_state():
    wrong_kind = {**STORED_U1, GOLDEN_FIELDS["event_count"]: b"b\x03\n\x01x"}
    with pytest.raises(BadState, match="expected int64_val"):
        reader_over(wrong_kind).read("u1")
    short = {**STORED_U1, GOLDEN_FIELDS["recent_action_tokens"]: b"r\x02\n\x00"}
    with pytest.raises(BadState, match="different lengths"):
        reader_over(short).read("u1")
    with pytest.raises(BadState, match="cannot be decoded"):
        reader_over({**STORED_U1, GOLDEN_FIELDS["state_version"]: b"\xff\xff\xff"}).read("u1")


@pytest.mark.parametrize("kind, old, new", [
    ("string_list_val", ["a", "bb"], ["a", "bb", "c"]),
    ("string_list_val", ["ü" * 70, "x"], ["ü" * 70, "x", "y" * 200, ""]),  # multi-byte lengths and values
    ("int64_list_val", [8, 10], [8, 10, 6]),  # small values: the bytes are the values
    ("int64_list_val", INT64S, INT64S + [978_307_260_000, -7, 3]),
    ("int64_list_val", [1, 2], [1, 2, 2**40]),
])
def test_decode_appended_reads_what_a_whole_decode_reads(kind, old, new):
    old_data, new_data = encode_typed(old, kind), encode_typed(new, kind)
    got = decode_appended(old_data, decode_typed(old_data, kind), new_data, kind)
    assert got == decode_typed(new_data, kind) == tuple(new)


@pytest.mark.parametrize("kind, old, new", [
    ("string_list_val", ["a", "bb"], ["a", "bb"]),  # unchanged: not grown
    ("string_list_val", ["a", "bb"], ["a"]),  # shorter
    ("string_list_val", ["a", "bb"], ["bb", "c"]),  # the window slid
    ("string_list_val", ["a", "bb"], ["a", "bc", "d"]),  # an old value changed
    ("string_list_val", ["a", "b"], ["a", "bc"]),  # the last old value grew: bytes extend, values do not
    ("string_list_val", [], ["a"]),  # nothing kept
    ("int64_list_val", [1, 2], [1, 3, 4]),
    ("int64_list_val", [1, 2], [1, 2 + 128]),  # a varint that grew a byte
    ("int64_list_val", [1, 2], [1]),
])
def test_decode_appended_refuses_what_did_not_only_grow(kind, old, new):
    old_data, new_data = encode_typed(old, kind), encode_typed(new, kind)
    assert decode_appended(old_data, decode_typed(old_data, kind) or (), new_data, kind) is None


def stored_state(items, times):
    """A user's stored hash: ``items`` (ids) at ``times`` (ms), one RATE each."""
    return {
        GOLDEN_FIELDS["recent_item_ids"]: encode_typed(items, "string_list_val"),
        GOLDEN_FIELDS["recent_action_tokens"]: encode_typed([2] * len(items), "int64_list_val"),
        GOLDEN_FIELDS["recent_rating_tokens"]: encode_typed([8 + i % 3 for i in range(len(items))], "int64_list_val"),
        GOLDEN_FIELDS["recent_event_times"]: encode_typed(times, "int64_list_val"),
        GOLDEN_FIELDS["event_count"]: encode_typed(len(items), "int64_val"),
        GOLDEN_FIELDS["last_event_time"]: encode_typed(times[-1], "int64_val"),
        GOLDEN_FIELDS["state_version"]: encode_typed(1, "int64_val"),
    }


def test_kept_states_read_what_a_fresh_reader_reads():
    """A reader that keeps states hands the same view back for an unchanged state, decodes a grown one's new
    events onto the kept ones (its history set grown from the kept set), and reads anything else whole: always the
    view a reader that keeps nothing reads."""
    items = [f"item-{i}" for i in range(300)]
    times = [978_307_200_000 + 60_000 * i for i in range(300)]
    stored: dict = {}
    keeping, fresh = reader_over(stored), reader_over(stored)
    keeping.recent_users = 2
    stored |= stored_state(items[:200], times[:200])
    first = keeping.read("u1")
    assert first == fresh.read("u1") and keeping.read("u1") is first
    assert first.history() == frozenset(items[:200]) and first.history() is first.history()
    stored |= stored_state(items[:203], times[:203])  # three new events
    grown = keeping.read("u1")
    assert grown == fresh.read("u1") and grown is not first and grown.item_ids[:200] == first.item_ids
    assert grown._history == frozenset(items[:203])  # built from the kept set
    stored |= stored_state(items[1:204], times[1:204])  # the window slid: read whole
    assert keeping.read("u1") == fresh.read("u1")
    stored |= {**stored_state(items[1:205], times[1:205]), GOLDEN_FIELDS["state_version"]: b"\xff\xff\xff"}
    with pytest.raises(BadState, match="cannot be decoded"):
        keeping.read("u1")
    assert keeping.read("someone-else") is None
    assert list(keeping.recent) == ["u1"] and len(keeping.recent) <= keeping.recent_users


def test_a_redis_reader_keeps_as_many_states_as_the_models_keep_rows():
    """compose's keep_states: the largest row cache of the served UGT models (a worker's RemoteModel: its local
    generator's), never lowered; a model without one (popularity) keeps none."""
    from types import SimpleNamespace

    from serving.compose import keep_states

    reader = reader_over(STORED_U1)
    keep_states(reader, {"movie": SimpleNamespace(name="popularity")})
    assert reader.recent_users == 0
    keep_states(reader, {"movie": SimpleNamespace(prepared_capacity=5), "book": SimpleNamespace(prepared_capacity=3)})
    assert reader.recent_users == 5
    keep_states(reader, {"movie": SimpleNamespace(local=SimpleNamespace(prepared_capacity=9))})
    assert reader.recent_users == 9
    keep_states(reader, {"movie": SimpleNamespace(prepared_capacity=2)})
    assert reader.recent_users == 9
    keep_states(SimpleNamespace(name="feast"), {"movie": SimpleNamespace(prepared_capacity=5)})  # no such reader
