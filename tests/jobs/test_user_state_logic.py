"""user_state job logic without Flink: state updates, batching of Feast rows, popularity, token decoding."""

from __future__ import annotations

import pytest
from job_events import make_event

from jobs.user_state_logic import (
    MonotonicClock,
    OnlineStateWriter,
    decode_token_event,
    popularity_key,
    update_state,
)
from models.tokenizer import tokenize_event
from models.user_state import UserState, states_from_events
from streams.serde import AvroSerde, SerdeError


def tokens(n: int, user: str = "u1", start: int = 0):
    return [tokenize_event(make_event(i, user=user)) for i in range(start, start + n)]


def test_update_state_matches_the_offline_reference_through_stored_dicts():
    events = tokens(30, "a") + tokens(12, "b")
    stored: dict[str, dict] = {}
    for event in reversed(events):  # any order: the rule sorts by event time
        state, is_new = update_state(stored.get(event.user_id), event, max_events=10)
        assert is_new
        stored[event.user_id] = state.to_dict()
    expected = states_from_events(events, max_events=10)
    assert {u: UserState.from_dict(d).to_feature_row() for u, d in stored.items()} == {
        u: s.to_feature_row() for u, s in expected.items()}


def test_duplicate_event_is_not_new():
    event = tokens(1)[0]
    state, is_new = update_state(None, event)
    assert is_new and state.event_count == 1
    again, is_new = update_state(state.to_dict(), event)
    assert not is_new and again.event_count == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_writer_batches_keeps_last_row_per_user_and_counts_popularity():
    written: list[list[dict]] = []
    bumps: list[list[tuple[str, str]]] = []
    clock = FakeClock()
    writer = OnlineStateWriter(written.append, bumps.append, max_rows=3, max_delay_s=0.5, clock=clock)
    stored: dict[str, dict] = {}
    for event in tokens(4, "a") + tokens(1, "b"):
        state, is_new = update_state(stored.get(event.user_id), event)
        stored[event.user_id] = state.to_dict()
        writer.add(state, (popularity_key(event.domain), event.item_id) if is_new else None)
    assert writer.pending() == 2 and not writer.due()
    clock.now = 0.6
    assert writer.due()
    assert writer.flush() == 2
    (batch,) = written
    assert {r["user_id"]: r["event_count"] for r in batch} == {"a": 4, "b": 1}
    assert len(bumps[0]) == 5 and bumps[0][0] == ("ugt:popularity:movie", "item0")
    assert writer.flush() == 0 and len(written) == 1  # nothing queued: no empty write


def test_writer_is_due_at_max_rows():
    writer = OnlineStateWriter(lambda rows: None, lambda items: None, max_rows=2, max_delay_s=60, clock=FakeClock())
    for user in ("a", "b"):
        state, _ = update_state(None, tokens(1, user)[0])
        writer.add(state, None)
    assert writer.due()


def test_writer_rejects_bad_limits():
    with pytest.raises(ValueError):
        OnlineStateWriter(lambda rows: None, lambda items: None, max_rows=0)


def test_monotonic_clock_strictly_increases_when_wall_clock_stalls():
    clock = MonotonicClock(now=lambda: 1_700_000_000.0)
    a, b, c = clock(), clock(), clock()
    assert a < b < c


def test_popularity_key():
    assert popularity_key("movie") == "ugt:popularity:movie"
    assert popularity_key("") == "ugt:popularity:movie"


def test_decode_token_event(serde: AvroSerde):
    event = tokens(1, "z")[0]
    data = serde.encode("u.tokens-value", "tokenized_event", event.to_record())
    assert decode_token_event(serde, data) == event
    with pytest.raises(SerdeError) as info:
        decode_token_event(serde, b"nope")
    assert info.value.reason_code == "BAD_MAGIC"
    user_event = serde.encode("u.raw-value", "user_event", make_event(1))
    with pytest.raises(SerdeError) as info:  # a UserEvent is not a TokenizedEvent
        decode_token_event(serde, user_event)
    assert info.value.reason_code in ("MISSING_FIELD", "WRONG_TYPE")
