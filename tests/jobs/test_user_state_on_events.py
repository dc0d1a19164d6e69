"""UserStateProcessor.on_events (one call per micro-batch of a key) against on_event per event: on random event
streams (duplicates, late and out-of-order events, spills into the long-term groups, timers firing between
batches), the same statuses, timers, Feast rows, popularity and state restored from Flink state."""

from __future__ import annotations

import random

import pytest
from job_events import make_event

from contracts.tokenizer import tokenize_event
from jobs.dict_store import DictKeyedStore
from jobs.user_state_logic import APPLIED, OnlineStateWriter, ProcessorConfig, UserStateProcessor


class Side:
    """One processor with its store, clock, writes and registered timers."""

    def __init__(self, config: ProcessorConfig, log_max: int) -> None:
        self.now_s = 0.0
        self.rows: list[list[dict]] = []
        self.long_rows: list[list[dict]] = []
        self.popularity: list[dict] = []
        writer = OnlineStateWriter(self.rows.append, self.popularity.append, max_rows=3, max_delay_s=0.2,
                                   clock=lambda: self.now_s, write_long_rows=self.long_rows.append)
        self.processor = UserStateProcessor(writer, config, log_max=log_max)
        self.store = DictKeyedStore()
        self.timers: set[tuple[int, str]] = set()

    def fire(self, now_ms: int) -> None:
        self.now_s = now_ms / 1000
        for at, user in sorted(t for t in self.timers if t[0] <= now_ms):
            self.timers.discard((at, user))
            self.store.user = user
            self.timers.update((new_at, user) for _, new_at in self.processor.on_timer(user, at, self.store, now_ms))
            self.processor.flush_if_due()

    def written(self) -> tuple:
        """What reached the online store: rows without the writer's incarnation, popularity batches."""
        return self.rows, self.long_rows, self.popularity


def random_batches(rng: random.Random) -> list[tuple[int, list]]:
    """(processing time ms, one user's events) batches: mostly in time order, some duplicates and late events."""
    users = [f"u{i}" for i in range(rng.randint(1, 4))]
    clock = {u: 1_600_000_000_000 for u in users}
    sent: list = []
    batches, now_ms, serial = [], 1_000, 0
    for _ in range(rng.randint(5, 40)):
        user = rng.choice(users)
        events = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.1 and sent:
                events.append(rng.choice(sent))  # a replayed event: DUPLICATE (or an older user's: its own key)
                continue
            clock[user] += rng.choice([1000, 1000, 5000, -2000]) if kind > 0.15 else -60_000  # out of order, late
            serial += 1
            events.append(tokenize_event(make_event(serial, user=user, t_ms=clock[user], item_id=f"i{serial % 9}")))
        events = [e for e in events if e.user_id == user]
        sent.extend(events)
        now_ms += rng.choice([0, 10, 50, 250, 700])
        if events:
            batches.append((now_ms, events))
    return batches


@pytest.mark.parametrize("seed", range(40))
def test_on_events_is_on_event_per_event(seed: int) -> None:
    rng = random.Random(seed)
    config = ProcessorConfig(max_events=rng.choice([3, 8, 50]), allowed_lateness_ms=rng.choice([None, 30_000]),
                             flush_ms=200, compact_interval_ms=rng.choice([500, 60_000]),
                             cache_size=rng.choice([0, 1, 100]))
    log_max = rng.choice([1, 4, 64])
    one, batched = Side(config, log_max), Side(config, log_max)
    statuses_seen = set()
    for now_ms, events in random_batches(rng):
        for side in (one, batched):
            side.fire(now_ms)
            side.store.user = events[0].user_id
        expected_statuses, expected_timers = [], []
        for event in events:
            outcome = one.processor.on_event(event, one.store, now_ms)
            expected_statuses.append(outcome.status)
            expected_timers.extend(outcome.timers)
        statuses, timers = batched.processor.on_events(events, batched.store, now_ms)
        assert (statuses, timers) == (expected_statuses, expected_timers)
        statuses_seen.update(statuses)
        for side, new in ((one, expected_timers), (batched, timers)):
            side.timers.update((at, events[0].user_id) for _, at in new)
            side.processor.flush_if_due()
    for side in (one, batched):
        side.fire(10**9)
        side.processor.writer.flush()
    assert batched.written() == one.written()
    assert APPLIED in statuses_seen
    # a restore (empty cache) rebuilds the same state, track and long-term groups from each side's Flink state
    for user in {u for (_, u) in one.store.data}:
        restored = []
        for side in (one, batched):
            side.store.user = user
            fresh = UserStateProcessor(OnlineStateWriter(lambda rows: None, lambda batch: None), config, log_max)
            state, track, _, _ = fresh._load(user, side.store, 10**9)
            restored.append((state.to_feature_row() if state else None, track.to_tuple()[0::2],
                             side.store.get_long()))
        assert restored[0] == restored[1]
