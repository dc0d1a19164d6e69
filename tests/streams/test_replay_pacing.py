"""streams/replay.py: event-time ordering and pacing, driven by a fake clock (pure logic, no Kafka)."""

from __future__ import annotations

import pytest

from contracts.datasets import Dataset, user_events
from streams.replay import MAX_SLEEP_CHUNK_S, Pacer, in_event_time_order, replay, schedule


class FakeClock:
    """Time only moves when the code under test sleeps (or a send takes `send_cost_s`)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def events_at(*seconds: float) -> list[dict]:
    return [{"event_id": f"e{i}", "event_time": int(s * 1000)} for i, s in enumerate(seconds)]


def test_schedule_scales_gaps() -> None:
    times = [0, 1000, 1000, 5000]  # ms
    assert list(schedule(times, speed=1.0)) == [0.0, 1.0, 1.0, 5.0]
    assert list(schedule(times, speed=1000.0)) == [0.0, 0.001, 0.001, 0.005]
    assert list(schedule(times, speed=None)) == [0.0, 0.0, 0.0, 0.0]


def test_schedule_caps_gaps_and_never_rewinds() -> None:
    assert list(schedule([0, 60_000, 61_000], speed=1.0, max_gap_s=10)) == [0.0, 10.0, 11.0]
    # an out-of-order event is due at once; later events keep the latest time as reference
    assert list(schedule([0, 5000, 2000, 6000], speed=1.0)) == [0.0, 5.0, 5.0, 6.0]


def test_pacer_rejects_bad_speed() -> None:
    with pytest.raises(ValueError, match="speed must be > 0"):
        Pacer(speed=0)
    with pytest.raises(ValueError, match="max_gap_s"):
        Pacer(speed=1, max_gap_s=-1)


def test_replay_sends_on_schedule() -> None:
    clock = FakeClock()
    sent: list[tuple[str, float]] = []
    events = events_at(0, 2, 2, 3.5)
    result = replay(events, lambda e: sent.append((e["event_id"], clock.now - 100.0)),
                    speed=2.0, clock=clock, sleep=clock.sleep, progress=False)
    assert sent == [("e0", 0.0), ("e1", 1.0), ("e2", 1.0), ("e3", 1.75)]
    assert result.count == 4 and result.seconds == pytest.approx(1.75)
    assert result.slept_s == pytest.approx(1.75) and result.max_behind_s == 0.0
    assert max(clock.sleeps) <= MAX_SLEEP_CHUNK_S  # long waits are cut into chunks (delivery reports run)


def test_replay_idle_runs_during_waits() -> None:
    clock = FakeClock()
    idles = []
    replay(events_at(0, 1), lambda e: None, speed=1.0, idle=lambda: idles.append(clock.now),
           clock=clock, sleep=clock.sleep, progress=False)
    assert len(idles) == round(1.0 / MAX_SLEEP_CHUNK_S)


def test_full_speed_never_sleeps() -> None:
    clock = FakeClock()
    result = replay(events_at(0, 1000, 5000), lambda e: None, speed=None, clock=clock,
                    sleep=clock.sleep, progress=False)
    assert clock.sleeps == [] and result.count == 3 and result.first_event_ms == 0 and result.last_event_ms == 5_000_000


def test_slow_sender_falls_behind_and_does_not_sleep() -> None:
    clock = FakeClock()

    def slow_send(_: dict) -> None:
        clock.now += 0.5  # each send costs 0.5 s, events are 0.1 s apart at this speed

    result = replay(events_at(0, 0.1, 0.2, 0.3), slow_send, speed=1.0, clock=clock, sleep=clock.sleep,
                    progress=False)
    assert clock.sleeps == []
    assert result.max_behind_s == pytest.approx(1.5 - 0.3)


def test_in_event_time_order_is_stable() -> None:
    events = [{"id": "a", "event_time": 5}, {"id": "b", "event_time": 1}, {"id": "c", "event_time": 5},
              {"id": "d", "event_time": 1}]
    assert [e["id"] for e in in_event_time_order(events)] == ["b", "d", "a", "c"]


def test_dataset_events_come_in_event_time_order_with_ties_in_row_order() -> None:
    import pandas as pd

    ratings = pd.DataFrame({"user_id": ["1", "2", "1", "3"], "item_id": ["a", "b", "c", "d"],
                            "timestamp": [30, 10, 10, 20], "rating": [5.0, 4.0, 3.0, float("nan")]})
    ratings["row"] = range(len(ratings))
    items = pd.DataFrame({"item_id": list("abcd"), "title": list("ABCD"), "year": pd.array([None] * 4, dtype="Int64"),
                          "genres": [[]] * 4})
    events = list(user_events(Dataset("toy", ratings, items)))
    assert [e["event_id"] for e in events] == ["toy:1", "toy:2", "toy:3", "toy:0"]
    assert [e["event_time"] for e in events] == [10_000, 10_000, 20_000, 30_000]
    assert events[2]["rating"] is None
    assert [e["event_id"] for e in user_events(Dataset("toy", ratings, items), limit=2)] == ["toy:1", "toy:2"]
