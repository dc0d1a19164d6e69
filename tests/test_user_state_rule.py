"""The per-user state rule: order independence, idempotence, window."""

from __future__ import annotations

import random

from contracts.tokenizer import tokenize_event
from contracts.user_state_rule import UserState, apply_event, states_from_events


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


# -- bounded lateness, versioned encoding, nearline compaction -------------------------------------------
def test_late_event_is_rejected_and_the_offline_fold_reports_it():
    from contracts.user_state_rule import LATE, apply_checked, fold_events

    state = states_from_events([event(i, t=100 + i) for i in range(5)])["u1"]  # newest at 104 s
    _, outcome = apply_checked(state, event(50, t=93), allowed_lateness_ms=10_000)
    assert outcome == LATE and state.event_count == 5
    _, outcome = apply_checked(state, event(51, t=95), allowed_lateness_ms=10_000)  # within lateness
    assert outcome == "applied" and state.event_count == 6
    states, late = fold_events([event(1, t=100), event(2, t=200), event(3, t=150), event(4, t=50)],
                               allowed_lateness_ms=60_000)
    assert [e.event_id for e in late] == ["e4"] and states["u1"].event_count == 3


def test_duplicate_wins_over_late():
    from contracts.user_state_rule import DUPLICATE, apply_checked

    state = states_from_events([event(1, t=1), event(2, t=1000)])["u1"]
    assert apply_checked(state, event(1, t=1), allowed_lateness_ms=0)[1] == DUPLICATE


def test_encoded_state_round_trips_and_refuses_other_versions():
    import pickle

    import pytest

    from contracts.user_state_rule import StateVersionError, decode_state, encode_state

    state = states_from_events([event(i) for i in range(30)], max_events=8)["u1"]
    data = encode_state(state, extra=("x", 1))
    assert decode_state(data) == state
    assert decode_state(data, with_extra=True) == (state, ("x", 1))
    old = pickle.dumps((1, *pickle.loads(data)[1:]))
    with pytest.raises(StateVersionError, match="version 1"):
        decode_state(old)
    assert UserState.from_dict(state.to_dict()) == state


def test_evicted_events_spill_and_counts_and_last_context_follow_event_time():
    state = states_from_events([event(i) for i in range(10)], max_events=4)["u1"]
    assert state.spill_items == [f"item{i}" for i in range(6)]
    assert state.action_counts[2] == 10  # RATE
    assert state.last_hour_token == event(9).hour_token
    late_but_allowed = apply_event(state, event(99, t=1), max_events=4)
    assert late_but_allowed.last_hour_token == event(9).hour_token  # not the newest: context unchanged


def test_compaction_is_coarse_early_fine_recent_and_bounded():
    from contracts.user_state_rule import compact, long_term_row

    state = states_from_events([event(i) for i in range(1200)], max_events=200)["u1"]
    long_term = compact(None, state, max_groups=16)
    counts = [g[1] for g in long_term.groups]
    assert sum(counts) == 1000 and len(counts) <= 16
    assert counts == sorted(counts, reverse=True)  # oldest groups cover the most events
    assert counts[-1] == 1  # the newest spilled event stays fine
    firsts = [g[2] for g in long_term.groups]
    assert firsts == sorted(firsts)
    row = long_term_row(long_term, state)
    assert row["long_group_item_ids"][-1] == "item999"
    assert len(row["long_group_item_ids"]) == sum(min(c, 4) for c in counts)
    assert row["compacted_event_count"] == 1200 and state.spill_items == []


def test_compaction_result_does_not_depend_on_when_timers_fired():
    from contracts.user_state_rule import compact, long_term_rows_from_events

    events = [event(i, t=i * 7 % 500) for i in range(700)]  # out of order too
    once = long_term_rows_from_events(events, max_events=50)["u1"]
    for step in (1, 13, 250):
        state, long_term = None, None
        for start in range(0, len(events), step):
            for e in events[start:start + step]:
                state = apply_event(state, e, max_events=50)
            long_term = compact(long_term, state)
        from contracts.user_state_rule import long_term_row

        assert long_term_row(long_term, state) == once
