"""The user_state job's logic, without Flink: token bytes -> per-user state -> Feast online rows + popularity.

:class:`UserStateProcessor` is the whole keyed operator in plain Python; the Flink function
(jobs/operators/user_state_fn.py) only hands it the current key's state (a :class:`KeyedStore`) and
registers the timers it asks for. Tests and bench/user_state_cost.py drive it with in-memory fakes.

Per event: contracts.user_state_rule.apply_checked (recent window, bounded lateness: LATE events go to the DLQ),
then the user is queued in :class:`OnlineStateWriter`, which writes rows in batches (the last state per user
wins inside a batch) to Feast together with the popularity increments. Every ``compact_interval_ms`` an
active user's timer folds the spill into the long-term groups (contracts.user_state_rule.compact) and queues the
`user_long_term` row.

Exactly-once effect. Flink restores state and Kafka offsets from the last checkpoint and replays what came
after, so every write must be idempotent:
  * Feast rows are whole states (last writer wins): a replay rewrites the same values.
  * Popularity (``ZINCRBY ugt:popularity:<domain>``) is not, so each applied event carries its per-user
    sequence number n (= event_count after it; Kafka keeps per-user order, so a replay gives the same n),
    and a Lua script (jobs/popularity_writer.py) increments only for n above the n recorded for that user
    (``ugt:popularity-applied:<domain>:<user_id>`` = "n origin"; origin = the first event id of this state's
    life, so a state that expired by TTL and started over is not mistaken for a replay).
  * Writes buffered in memory when a checkpoint is taken would be lost by a crash (PyFlink has no
    pre-checkpoint hook), so what a user still owes the store (pending popularity, a long-term row) stays in
    keyed state until a per-user confirm timer, fired after a flush of this writer incarnation, clears it.
    After a restore the confirm timers (checkpointed with the state) find another incarnation and queue the
    user again.
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, Protocol

from contracts.tokenizer import TokenizedEvent
from contracts.user_state_rule import (
    APPLIED,
    DEFAULT_MAX_EVENTS,
    LONG_TERM_VIEW,
    LongTermState,
    UserState,
    apply_checked,
    compact,
    decode_state,
    encode_state,
    long_term_row,
)
from streams.serde import AvroSerde, RegistryError, SerdeError

JOB_NAME = "user_state"
PUSH_SOURCE = "user_recent_events_push"
FEATURE_VIEW = "user_recent_events"
LATE_EVENT = "LATE_EVENT"

FLUSH_TIMER, COMPACT_TIMER = 0, 1


def decode_token_event(serde: AvroSerde, data: bytes | None) -> TokenizedEvent:
    """events.tokens bytes -> TokenizedEvent; SerdeError with a reason code when they are not one."""
    decoded = serde.decode_raw(data)
    try:
        return TokenizedEvent.from_record(decoded.record)
    except RegistryError:
        raise
    except KeyError as exc:
        raise SerdeError("MISSING_FIELD", f"tokenized event lacks {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise SerdeError("WRONG_TYPE", f"not a TokenizedEvent: {exc}") from exc


_EVENT_FIELDS = attrgetter(*TokenizedEvent.__dataclass_fields__)


def log_entry(event: TokenizedEvent, at_ms: int) -> bytes:
    """One entry of user_state's event log (the events since the user's last snapshot, in Flink state): the
    event's fields as a tuple, in declaration order, and when it was applied. A tuple, not the object: 93 bytes
    instead of 331 per ML-1M event in every checkpoint, and a pickle 2.5x cheaper on the per-event path."""
    return pickle.dumps((_EVENT_FIELDS(event), at_ms), protocol=pickle.HIGHEST_PROTOCOL)


def batch_log_entry(fields: list[tuple], at_ms: int) -> bytes:
    """One log entry for the events a micro-batch applied together (one pickle, one ListState element): a list
    of :func:`log_entry`'s field tuples and their common apply time."""
    return pickle.dumps((fields, at_ms), protocol=pickle.HIGHEST_PROTOCOL)


def update_state(
    stored: Mapping[str, Any] | None, event: TokenizedEvent, max_events: int = DEFAULT_MAX_EVENTS
) -> tuple[UserState, bool]:
    """(state after the event, whether the event was new); `stored` is UserState.to_dict() or None."""
    state = UserState.from_dict(dict(stored)) if stored is not None else None
    state, outcome = apply_checked(state, event, max_events)
    return state, outcome == APPLIED


# -----------------------------------------------------------------------------------------------------
# batching writer
# -----------------------------------------------------------------------------------------------------
@dataclass
class Track:
    """What a user still owes the online store, kept in keyed state beside the UserState."""

    pending: list[tuple[int, str, str]] = field(default_factory=list)  # (n, domain, item_id) not confirmed
    queued: tuple[str, int] = ("", -1)  # (writer incarnation, batch number) it was last queued in
    long_dirty: bool = False  # a long-term row is owed
    flush_timer: int = 0  # registered confirm timer (ms), 0 = none
    compact_timer: int = 0  # registered compaction timer (ms), 0 = none

    def to_tuple(self) -> tuple:
        return (self.pending, self.queued, self.long_dirty, self.flush_timer, self.compact_timer)

    @classmethod
    def from_tuple(cls, values: tuple) -> Track:
        return cls([tuple(p) for p in values[0]], tuple(values[1]), *values[2:])


class OnlineStateWriter:
    """Buffers feature rows and popularity increments; writes them in batches.

    `write_rows(rows)` / `write_long_rows(rows)` write Feast rows and `incr_popularity(batch)` applies
    popularity (batch: {domain: {user_id: (origin, [(n, item_id), ...])}}). A batch goes out when it holds
    `max_rows` users or its oldest entry waited `max_delay_s`; the operator also flushes on timers, at the end of
    each process-mode bundle and at close; `after_write()` runs after each batch's writes (a replica WAIT). `epoch()` names the batch a user is queued in; `is_flushed(epoch)` says that batch was written.
    """

    def __init__(
        self,
        write_rows: Callable[[list[dict[str, Any]]], None],
        incr_popularity: Callable[[dict[str, dict[str, tuple[str, list[tuple[int, str]]]]]], None],
        max_rows: int = 500,
        max_delay_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        write_long_rows: Callable[[list[dict[str, Any]]], None] | None = None,
        after_write: Callable[[], None] | None = None,
    ):
        if max_rows < 1 or max_delay_s < 0:
            raise ValueError(f"max_rows must be >= 1 and max_delay_s >= 0, got {max_rows}, {max_delay_s}")
        self.write_rows = write_rows
        self.write_long_rows = write_long_rows or (lambda rows: None)
        self.incr_popularity = incr_popularity
        self.after_write = after_write or (lambda: None)  # e.g. WAIT for replicas (jobs/replica_wait.py)
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.clock = clock
        self.incarnation = uuid.uuid4().hex
        self.batch = 0
        self.states: dict[str, UserState] = {}  # latest state per user; rows are built at flush
        self.tracks: dict[str, Track] = {}
        self.long_rows: dict[str, dict[str, Any]] = {}
        self.first_at: float | None = None
        self.rows_written = 0
        self.batches_written = 0

    def epoch(self) -> tuple[str, int]:
        return (self.incarnation, self.batch)

    def is_flushed(self, epoch: tuple[str, int]) -> bool:
        return epoch[0] == self.incarnation and epoch[1] < self.batch

    def add(self, state: UserState, track: Track | None = None, long_row: dict[str, Any] | None = None) -> None:
        """Queue the user's current state (replacing an older queued one), its owed popularity and long row.

        The objects are read at flush time, so later in-place updates are written too (the newest wins).
        """
        if self.first_at is None:
            self.first_at = self.clock()
        self.states[state.user_id] = state
        if track is not None:
            self.tracks[state.user_id] = track
            track.queued = self.epoch()
        if long_row is not None:
            self.long_rows[state.user_id] = long_row

    def due(self) -> bool:
        if self.first_at is None:
            return False
        return len(self.states) >= self.max_rows or self.clock() - self.first_at >= self.max_delay_s

    def pending(self) -> int:
        return len(self.states)

    def flush(self) -> int:
        """Write what is queued; returns the number of recent-view rows written."""
        states, tracks, long_rows = self.states, self.tracks, self.long_rows
        self.states, self.tracks, self.long_rows, self.first_at = {}, {}, {}, None
        self.batch += 1
        rows = [state.to_feature_row() for state in states.values()]
        popularity: dict[str, dict[str, tuple[str, list[tuple[int, str]]]]] = {}
        for user_id, track in tracks.items():
            origin = states[user_id].origin
            for n, domain, item in track.pending:
                popularity.setdefault(domain, {}).setdefault(user_id, (origin, []))[1].append((n, item))
        if rows:
            self.write_rows(rows)
            self.rows_written += len(rows)
            self.batches_written += 1
        if long_rows:
            self.write_long_rows(list(long_rows.values()))
        if popularity:
            self.incr_popularity(popularity)
        if rows or long_rows or popularity:
            self.after_write()  # raises when the writes are not durable as configured: the flush fails
        return len(rows)


# -----------------------------------------------------------------------------------------------------
# the keyed operator, without Flink
# -----------------------------------------------------------------------------------------------------
class KeyedStore(Protocol):
    """The current key's Flink state: snapshot and long-term ValueStates, the event log ListState (bytes)."""

    def get(self) -> bytes | None: ...
    def put(self, data: bytes) -> None: ...
    def get_long(self) -> bytes | None: ...
    def put_long(self, data: bytes) -> None: ...
    def log_get(self) -> Iterable[bytes] | None: ...
    def log_add(self, data: bytes) -> None: ...
    def log_clear(self) -> None: ...


@dataclass(frozen=True)
class ProcessorConfig:
    max_events: int = DEFAULT_MAX_EVENTS
    allowed_lateness_ms: int | None = 24 * 3600 * 1000
    flush_ms: int = 200
    compact_interval_ms: int = 5 * 60 * 1000
    state_ttl_ms: int = 90 * 24 * 3600 * 1000
    cache_size: int = 5_000  # users whose decoded state stays in memory (0 = decode every event)


@dataclass
class Outcome:
    """What one event did: APPLIED / DUPLICATE / LATE, and the timers to register (kind, time_ms)."""

    status: str
    timers: list[tuple[int, int]] = field(default_factory=list)


def _align(time_ms: int, step_ms: int) -> int:
    """Round up to a multiple of step, so users' timers coincide and one flush serves them all."""
    step = max(1, step_ms)
    return -(-time_ms // step) * step


class UserStateProcessor:
    """Per event and per timer of one key; owns the writer and a cache of decoded states.

    Flink state per user: a snapshot (the encoded UserState + Track) and a log of the events applied since
    (ListState, one small entry per event). Re-encoding the whole state (up to max_events events) on every
    event was the job's main cost; now the snapshot is rewritten on the user's timers, after log_max events,
    and whenever the long-term state changes, and read back (snapshot + log replayed through the same
    code, with each event's original processing time) only when the decoded state is not in the cache.
    """

    def __init__(self, writer: OnlineStateWriter, config: ProcessorConfig, log_max: int = 64):
        self.writer = writer
        self.config = config
        self.log_max = log_max if config.cache_size > 0 else 0  # without a cache every event would replay the log
        # user -> [state, track, last write (ms), log entries]
        self.cache: OrderedDict[str, list[Any]] = OrderedDict()
        self.compactions = 0

    # -- state access --------------------------------------------------------------------------------
    def _load(self, user_id: str, store: KeyedStore, now_ms: int) -> list[Any]:
        """[state or None, track, last write, log length], from the cache or from Flink state."""
        cached = self.cache.get(user_id)
        if cached is not None:
            if now_ms - cached[2] < self.config.state_ttl_ms:
                return cached
            del self.cache[user_id]  # Flink's TTL may have expired it: ask Flink
        data = store.get()
        entry: list[Any] = [None, Track(), now_ms, 0]
        if data is not None:
            state, extra = decode_state(data, with_extra=True)
            entry[0], entry[1] = state, Track.from_tuple(extra) if extra else Track()
        for logged in store.log_get() or ():
            event, at_ms = pickle.loads(logged)
            # a batch's field tuples (batch_log_entry), one event's (log_entry), or (before 2026-12) the object
            events = [TokenizedEvent(*e) for e in event] if event.__class__ is list else \
                [TokenizedEvent(*event) if event.__class__ is tuple else event]
            for event in events:
                self._apply(entry, event, store, at_ms)  # same inputs, same result; its timers exist already
                entry[3] += 1
        return entry

    def _remember(self, entry: list[Any], now_ms: int) -> None:
        if self.config.cache_size > 0:
            entry[2] = now_ms
            cache = self.cache
            cache[entry[0].user_id] = entry
            cache.move_to_end(entry[0].user_id)
            if len(cache) > self.config.cache_size:
                cache.popitem(last=False)

    def _snapshot(self, entry: list[Any], store: KeyedStore) -> None:
        """Write the whole state and empty the log."""
        store.put(encode_state(entry[0], extra=entry[1].to_tuple()))
        if entry[3]:
            store.log_clear()
            entry[3] = 0

    # -- per event ------------------------------------------------------------------------------------
    def _fold(self, entry: list[Any], event: TokenizedEvent, store: KeyedStore, now_ms: int,
              timers: list[tuple[int, int]]) -> tuple[str, bool]:
        """The event's effect on state and track, timers to register appended to `timers`; (status, whether the
        long-term state was written). The writer is not told (see _apply)."""
        state, status = apply_checked(entry[0], event, self.config.max_events, self.config.allowed_lateness_ms)
        entry[0] = state
        if status != APPLIED:
            return status, False
        track = entry[1]
        track.pending.append((state.event_count, event.domain, event.item_id))
        if track.flush_timer == 0:
            track.flush_timer = _align(now_ms + self.config.flush_ms, self.config.flush_ms)
            timers.append((FLUSH_TIMER, track.flush_timer))
        if track.compact_timer == 0:
            track.compact_timer = _align(now_ms + self.config.compact_interval_ms, self.config.compact_interval_ms)
            timers.append((COMPACT_TIMER, track.compact_timer))
        if len(state.spill_times) >= self.config.max_events:  # bound the state between compactions
            data = store.get_long()
            store.put_long(compact(LongTermState.decode(data) if data is not None else None, state).encode())
            return status, True
        return status, False

    def _apply(self, entry: list[Any], event: TokenizedEvent, store: KeyedStore, now_ms: int) -> tuple[Outcome, bool]:
        """The event's effect on state, track and writer; (outcome, whether the long-term state was written)."""
        outcome = Outcome("")
        outcome.status, folded = self._fold(entry, event, store, now_ms, outcome.timers)
        if outcome.status == APPLIED:
            self.writer.add(entry[0], entry[1])  # read at flush time: later events of the batch are written too
        return outcome, folded

    def on_event(self, event: TokenizedEvent, store: KeyedStore, now_ms: int) -> Outcome:
        entry = self._load(event.user_id, store, now_ms)
        outcome, folded = self._apply(entry, event, store, now_ms)
        if outcome.status != APPLIED:
            return outcome
        if folded or entry[3] >= self.log_max:
            self._snapshot(entry, store)  # the long-term state changed: the log must not fold it again
        else:
            store.log_add(log_entry(event, now_ms))
            entry[3] += 1
        self._remember(entry, now_ms)
        return outcome

    def on_events(self, events: list[TokenizedEvent], store: KeyedStore,
                  now_ms: int) -> tuple[list[str], list[tuple[int, int]]]:
        """on_event over one key's events of a micro-batch, in order, all at now_ms: (status per event, timers to
        register). The same state, writes, timers and snapshots as one on_event per event, with the state loaded
        and cached once, the writer told once (its state is read at flush time), and the events logged since the last snapshot in one log entry
        (batch_log_entry) instead of one each."""
        entry = self._load(events[0].user_id, store, now_ms)
        statuses: list[str] = []
        timers: list[tuple[int, int]] = []
        logged: list[tuple] = []  # entry[3] counts them already; they reach the store at the end
        applied = False
        fold = self._fold
        for event in events:
            status, folded = fold(entry, event, store, now_ms, timers)
            statuses.append(status)
            if status != APPLIED:
                continue
            if not applied:  # before any snapshot: the stored track must say which writer batch holds the user
                applied = True
                self.writer.add(entry[0], entry[1])
            if folded or entry[3] >= self.log_max:  # where on_event snapshots: the same state in the store
                self._snapshot(entry, store)
                logged = []
            else:
                logged.append(_EVENT_FIELDS(event))
                entry[3] += 1
        if applied:
            if logged:
                store.log_add(batch_log_entry(logged, now_ms))
            self._remember(entry, now_ms)
        return statuses, timers

    # -- timers ---------------------------------------------------------------------------------------
    def on_timer(self, user_id: str, timestamp: int, store: KeyedStore, now_ms: int) -> list[tuple[int, int]]:
        """A confirm and/or compaction timer of this user fired; returns timers to register."""
        entry = self._load(user_id, store, now_ms)
        state, track = entry[0], entry[1]
        if state is None:
            return []  # expired by TTL
        timers: list[tuple[int, int]] = []
        changed = False
        if track.compact_timer and timestamp >= track.compact_timer:
            self._compact(state, track, store)
            track.compact_timer = 0
            changed = True
            if track.flush_timer == 0:  # the long row is owed until a flush is confirmed
                track.flush_timer = _align(now_ms + self.config.flush_ms, self.config.flush_ms)
                timers.append((FLUSH_TIMER, track.flush_timer))
        if track.flush_timer and timestamp >= track.flush_timer:
            if not self.writer.is_flushed(track.queued):
                if track.queued[0] != self.writer.incarnation:  # restored from a checkpoint: queue again
                    long_row = self._compact(state, track, store) if track.long_dirty else None
                    self.writer.add(state, track, long_row)
                self.writer.flush()
            track.pending = []
            track.long_dirty = False
            track.flush_timer = 0
            changed = True
        if changed or entry[3]:
            self._snapshot(entry, store)
        self._remember(entry, now_ms)
        return timers

    def _compact(self, state: UserState, track: Track, store: KeyedStore) -> dict[str, Any]:
        """Fold the spill into the long-term groups, store them, queue the long row; returns it."""
        data = store.get_long()
        long_term = compact(LongTermState.decode(data) if data is not None else None, state)
        store.put_long(long_term.encode())
        row = long_term_row(long_term, state)
        self.writer.add(state, track, row)
        track.long_dirty = True
        self.compactions += 1
        return row

    def flush_if_due(self) -> int:
        return self.writer.flush() if self.writer.due() else 0


# -----------------------------------------------------------------------------------------------------
# I/O: Feast rows (popularity: jobs/popularity_writer.py)
# -----------------------------------------------------------------------------------------------------
class MonotonicClock:
    """Wall-clock UTC datetimes that strictly increase (Feast's Redis store drops a row not newer than the stored one)."""

    def __init__(self, now: Callable[[], float] = time.time):
        self.now = now
        self.last_us = 0

    def __call__(self) -> datetime:
        now_us = max(int(self.now() * 1_000_000), self.last_us + 1)
        self.last_us = now_us
        return datetime.fromtimestamp(now_us / 1_000_000, tz=timezone.utc)


def feast_row_writer(store: Any, push_source: str = PUSH_SOURCE) -> Callable[[list[dict[str, Any]]], None]:
    """Rows -> one `store.push(..., to=PushMode.ONLINE)` call (a DataFrame with an event_timestamp)."""
    import pandas as pd
    from feast.data_source import PushMode

    clock = MonotonicClock()

    def write(rows: list[dict[str, Any]]) -> None:
        frame = pd.DataFrame(rows)
        frame["event_timestamp"] = clock()
        store.push(push_source, frame, to=PushMode.ONLINE)

    return write


def feast_direct_writer(store: Any, feature_view: str = FEATURE_VIEW) -> Callable[[list[dict[str, Any]]], None]:
    """Rows -> one ``write_rows`` of UGT's Feast online store (infra/feast_online_store.py).

    Same Redis entries as `store.push` (Feast's own online_write_batch writes them, values typed by the
    view's schema), at 0.6x push's client CPU: push converts every list element through pandas and pyarrow
    (docs/FEAST.md).
    """
    from infra.feast_online_store import open_online_store

    online = open_online_store(store)
    view = store.get_feature_view(feature_view)
    clock = MonotonicClock()

    def write(rows: list[dict[str, Any]]) -> None:
        online.write_rows(store.config, view, rows, clock())

    return write


def feast_long_term_writer(store: Any) -> Callable[[list[dict[str, Any]]], None]:
    """Long-term rows -> the `user_long_term` view (write_rows)."""
    return feast_direct_writer(store, LONG_TERM_VIEW)
