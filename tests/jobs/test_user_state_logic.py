"""user_state job logic without Flink: state updates, batching of Feast rows, popularity, token decoding."""

from __future__ import annotations

import pytest
from job_events import make_event

from contracts.redis_keys import popularity_key
from contracts.tokenizer import TokenizedEvent, tokenize_event
from contracts.user_state_rule import UserState, states_from_events
from jobs.dict_store import DictKeyedStore
from jobs.user_state_logic import (
    MonotonicClock,
    OnlineStateWriter,
    ProcessorConfig,
    Track,
    UserStateProcessor,
    decode_token_event,
    update_state,
)
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
    bumps: list[dict] = []
    clock = FakeClock()
    writer = OnlineStateWriter(written.append, bumps.append, max_rows=3, max_delay_s=0.5, clock=clock)
    stored: dict[str, dict] = {}
    tracks: dict[str, Track] = {}
    for event in tokens(4, "a") + tokens(1, "b"):
        state, is_new = update_state(stored.get(event.user_id), event)
        assert is_new
        stored[event.user_id] = state.to_dict()
        track = tracks.setdefault(event.user_id, Track())
        track.pending.append((state.event_count, event.domain, event.item_id))
        writer.add(state, track)
    assert writer.pending() == 2 and not writer.due()
    epoch = writer.epoch()
    assert not writer.is_flushed(epoch)
    clock.now = 0.6
    assert writer.due()
    assert writer.flush() == 2
    assert writer.is_flushed(epoch) and not writer.is_flushed(("other", 0))
    (batch,) = written
    assert {r["user_id"]: r["event_count"] for r in batch} == {"a": 4, "b": 1}
    origin, items = bumps[0]["movie"]["a"]
    assert origin == "e0" and items == [(1, "item0"), (2, "item1"), (3, "item2"), (4, "item3")]
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


# -- the whole keyed operator without Flink: UserStateProcessor with in-memory state and timers --------


class Sink:
    """The online store: rows last-writer-wins; popularity counted only above each user's recorded n
    (what jobs.popularity_writer.POPULARITY_SCRIPT does in Redis; tested against real Redis in tests/integration)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.long_rows: dict[str, dict] = {}
        self.applied: dict[tuple[str, str], tuple[str, int]] = {}
        self.popularity: dict[tuple[str, str], int] = {}

    def write_rows(self, rows):
        self.rows.update({r["user_id"]: r for r in rows})

    def write_long_rows(self, rows):
        self.long_rows.update({r["user_id"]: r for r in rows})

    def incr(self, batch):
        for domain, users in batch.items():
            for user, (origin, items) in users.items():
                stored_origin, done = self.applied.get((domain, user), ("", 0))
                done = done if stored_origin == origin else 0
                top = done
                for n, item in items:
                    if n > done:
                        self.popularity[(domain, item)] = self.popularity.get((domain, item), 0) + 1
                        top = max(top, n)
                self.applied[(domain, user)] = (origin, top)


class Job:
    """One incarnation of the operator: a processor over a (possibly restored) state dict and timer set."""

    def __init__(self, sink: Sink, data: dict, timers: set, config: ProcessorConfig, max_rows: int = 10_000):
        self.clock = FakeClock()
        writer = OnlineStateWriter(sink.write_rows, sink.incr, max_rows=max_rows, max_delay_s=0.2,
                                   clock=lambda: self.clock.now / 1000, write_long_rows=sink.write_long_rows)
        self.processor = UserStateProcessor(writer, config)
        self.data, self.timers = data, timers
        self.late: list[str] = []

    def event(self, event, now_ms: int) -> None:
        self.clock.now = now_ms
        out = self.processor.on_event(event, DictKeyedStore(self.data, event.user_id), now_ms)
        if out.status == "late":
            self.late.append(event.event_id)
        self.timers.update((event.user_id, at) for _, at in out.timers)
        self.processor.flush_if_due()

    def advance(self, now_ms: int) -> None:
        """Fire every timer due by now_ms, in time order (as Flink does)."""
        self.clock.now = now_ms
        while due := sorted((at, user) for user, at in self.timers if at <= now_ms):
            at, user = due[0]
            self.timers.discard((user, at))
            for _, new_at in self.processor.on_timer(user, at, DictKeyedStore(self.data, user), at):
                self.timers.add((user, new_at))
            self.processor.flush_if_due()

    def snapshot(self) -> tuple[dict, set]:
        return dict(self.data), set(self.timers)


CONFIG = ProcessorConfig(max_events=20, allowed_lateness_ms=3_600_000, flush_ms=200, compact_interval_ms=500_000)


def stream(n_users: int = 6, per_user: int = 60):
    """Interleaved events of several users, some out of order, one late, one duplicate."""
    events = []
    for i in range(per_user):
        for u in range(n_users):
            t = 1_600_000_000_000 + i * 60_000 - (120_000 if i % 7 == 3 else 0)
            events.append(tokenize_event(make_event(i * n_users + u, user=f"u{u}", t_ms=t)))
    events.append(tokenize_event(make_event(10_000, user="u0", t_ms=1_600_000_000_000 - 7_200_000)))  # late
    events.append(events[-2 * n_users])  # a duplicate (still in the window)
    return events


def expected(events):
    from collections import Counter

    from contracts.user_state_rule import fold_events, long_term_rows_from_events

    states, late = fold_events(events, CONFIG.max_events, CONFIG.allowed_lateness_ms)
    late_ids = {e.event_id for e in late}
    applied = {e.event_id: e for e in events if e.event_id not in late_ids}.values()
    counted = Counter((e.domain, e.item_id) for e in applied)
    return ({u: s.to_feature_row() for u, s in states.items()},
            long_term_rows_from_events(events, CONFIG.max_events, CONFIG.allowed_lateness_ms),
            dict(counted), sorted(late_ids))


def test_processor_equals_the_offline_reference():
    events = stream()
    sink = Sink()
    job = Job(sink, {}, set(), CONFIG, max_rows=4)
    for i, event in enumerate(events):
        job.event(event, now_ms=i * 1000)  # several compactions per user on the way
    job.advance(10 ** 9)
    rows, long_rows, popularity, late = expected(events)
    assert sink.rows == rows and sink.long_rows == long_rows and sink.popularity == popularity
    assert job.late == late == ["e10000"]
    assert all(r["long_group_counts"] for r in long_rows.values())  # the windows overflowed: real compaction


def test_processor_without_cache_gives_the_same_result():
    from dataclasses import replace

    events = stream(3, 40)
    a, b = Sink(), Sink()
    for sink, config in ((a, CONFIG), (b, replace(CONFIG, cache_size=0))):
        job = Job(sink, {}, set(), config, max_rows=3)
        for i, event in enumerate(events):
            job.event(event, now_ms=i * 10)
        job.advance(10 ** 9)
    assert a.rows == b.rows and a.long_rows == b.long_rows and a.popularity == b.popularity


@pytest.mark.parametrize("flushed_before_crash", [True, False])
@pytest.mark.parametrize("crash_at", [37, 150, 301])
def test_restore_from_a_checkpoint_and_replay_applies_every_event_exactly_once(crash_at: int,
                                                                              flushed_before_crash: bool):
    """Snapshot (checkpoint) mid-stream while writes are still buffered, keep going (writes reach the
    sink), crash, restore the snapshot into a new incarnation and replay from the snapshot's offset."""
    events = stream()
    checkpoint_at = crash_at - 30
    # a quiet user whose only events come just before the checkpoint: nothing in the replay touches it
    quiet = [tokenize_event(make_event(20_000 + i, user="quiet", t_ms=1_600_000_000_000 + i)) for i in range(25)]
    events[checkpoint_at - 2:checkpoint_at - 2] = quiet[:2]
    events[:0] = quiet[2:]
    checkpoint_at += len(quiet)
    sink = Sink()
    job = Job(sink, {}, set(), CONFIG, max_rows=10_000)  # big batches: the checkpoint sees buffered writes
    snapshot = None
    for i, event in enumerate(events[:crash_at]):
        job.event(event, now_ms=i * 10)
        if i + 1 == checkpoint_at:
            assert "quiet" in job.processor.writer.states  # its last writes are still buffered
            snapshot = job.snapshot()
        job.advance(i * 10)
    if flushed_before_crash:
        job.processor.writer.flush()  # what reached Redis before the crash counts (else it is lost)
    data, timers = snapshot
    restored = Job(sink, dict(data), set(timers), CONFIG)
    restored.advance(99_000)  # the restored confirm timers fire (compaction timers come later)
    rows, long_rows, popularity, _ = expected(events)
    assert sink.rows["quiet"] == rows["quiet"]
    assert sink.popularity[("movie", "item5")] >= sum(1 for e in quiet if e.item_id == "item5")
    for i, event in enumerate(events[checkpoint_at:], start=checkpoint_at):
        restored.event(event, now_ms=100_000 + i * 10)
        restored.advance(100_000 + i * 10)
    restored.advance(10 ** 9)
    assert sink.rows == rows and sink.long_rows == long_rows
    assert sink.popularity == popularity  # 0 lost, 0 counted twice


def test_state_expires_with_ttl():
    from dataclasses import replace

    config = replace(CONFIG, state_ttl_ms=1_000)
    data: dict = {}
    job = Job(Sink(), data, set(), config)
    job.event(tokens(1, "t")[0], now_ms=0)
    assert job.processor._load("t", DictKeyedStore(data, "t"), 500)[0] is not None
    for key in [k for k in data if k[1] == "t"]:  # Flink's TTL dropped it; the cache must not keep it alive
        del data[key]
    assert job.processor._load("t", DictKeyedStore(data, "t"), 2_000)[0] is None


def test_log_entries_of_both_formats_replay_the_same():
    """Entries hold the event's fields as a tuple; entries written before that (the pickled object) still replay."""
    import pickle

    from jobs.user_state_logic import log_entry

    events = tokens(6, "fmt")
    event, at_ms = pickle.loads(log_entry(events[0], 123))
    assert event.__class__ is tuple and at_ms == 123
    assert len(log_entry(events[0], 123)) < len(pickle.dumps((events[0], 123), protocol=pickle.HIGHEST_PROTOCOL))
    states = []
    for old_format in (False, True):
        data: dict = {}
        store = DictKeyedStore(data, "fmt")
        job = Job(Sink(), data, set(), CONFIG)
        for i, e in enumerate(events):
            job.event(e, now_ms=i * 10)
        log = data[("log", "fmt")]
        assert log, "the events since the snapshot are in the log"
        if old_format:
            data[("log", "fmt")] = [pickle.dumps((TokenizedEvent(*pickle.loads(x)[0]), pickle.loads(x)[1]),
                                                 protocol=pickle.HIGHEST_PROTOCOL) for x in log]
        restored = Job(Sink(), data, set(), CONFIG)  # a new incarnation: empty cache, state from the store
        states.append(restored.processor._load("fmt", store, 1_000)[0])
    assert states[0] is not None and states[0] == states[1]
    assert states[0].event_count == len(events)
