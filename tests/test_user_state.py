"""The per-user state rule: order independence, idempotence, window."""

from __future__ import annotations

import random

from models.tokenizer import tokenize_event
from models.user_state import UserState, apply_event, states_from_events


def event(i: int, user: str = "u1", t: int | None = None):
    return tokenize_event(
        {
            "event_id": f"e{i}",
            "user_id": user,
            "item_id": f"item{i}",
            "action": "RATE",
            "event_time": (t if t is not None else i) * 1000,
            "rating": float(1 + i % 5),
        }
    )


def test_keeps_last_n_sorted_by_event_time():
    state = states_from_events([event(i) for i in range(10)], max_events=4)["u1"]
    assert state.item_ids == ["item6", "item7", "item8", "item9"]
    assert state.event_count == 10
    assert state.last_event_time == 9000


def test_arrival_order_does_not_change_the_state():
    events = [event(i, user=f"u{i % 3}", t=i // 2) for i in range(60)]  # ties in event time
    expected = {u: s.to_feature_row() for u, s in states_from_events(events, max_events=7).items()}
    for seed in range(5):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        got = {u: s.to_feature_row() for u, s in states_from_events(shuffled, max_events=7).items()}
        assert got == expected


def test_replayed_event_is_applied_once():
    events = [event(i) for i in range(5)]
    once = states_from_events(events)["u1"].to_feature_row()
    twice = states_from_events(events + events[2:4])["u1"].to_feature_row()
    assert twice == once


def test_dict_round_trip_for_flink_state():
    state = states_from_events([event(i) for i in range(3)])["u1"]
    restored = UserState.from_dict(state.to_dict())
    assert restored == state
    assert apply_event(restored, event(3)).item_ids[-1] == "item3"
