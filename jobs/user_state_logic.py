"""The user_state job's logic, without Flink: token bytes -> per-user state -> Feast online rows + popularity.

Per event the keyed operator calls :func:`update_state` (models.user_state.apply_event on the stored
dict) and hands the new feature row to :class:`OnlineStateWriter`, which batches rows (the last row per
user wins inside a batch) and writes them to Feast in one call, together with the popularity increments.

Popularity (the serving fallback) lives in Redis sorted sets, one per domain:
    ZINCRBY ugt:popularity:<domain> 1 <item_id>      (score = events seen for the item)
An event that the state had already applied (a replay) does not count again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from models.tokenizer import TokenizedEvent
from models.user_state import DEFAULT_MAX_EVENTS, UserState, apply_event
from streams.serde import AvroSerde, RegistryError, SerdeError

JOB_NAME = "user_state"
PUSH_SOURCE = "user_recent_events_push"
FEATURE_VIEW = "user_recent_events"
POPULARITY_PREFIX = "ugt:popularity:"


def popularity_key(domain: str) -> str:
    """The Redis sorted set of item popularity for one domain (what serving's fallback reads)."""
    return f"{POPULARITY_PREFIX}{domain or 'movie'}"


def decode_token_event(serde: AvroSerde, data: bytes | None) -> TokenizedEvent:
    """events.tokens bytes -> TokenizedEvent; SerdeError with a reason code when they are not one."""
    decoded = serde.decode(data)
    try:
        return TokenizedEvent.from_record(decoded.record)
    except RegistryError:
        raise
    except KeyError as exc:
        raise SerdeError("MISSING_FIELD", f"tokenized event lacks {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise SerdeError("WRONG_TYPE", f"not a TokenizedEvent: {exc}") from exc


def update_state(
    stored: Mapping[str, Any] | None, event: TokenizedEvent, max_events: int = DEFAULT_MAX_EVENTS
) -> tuple[UserState, bool]:
    """(state after the event, whether the event was new); `stored` is UserState.to_dict() or None."""
    state = UserState.from_dict(stored) if stored is not None else None
    before = state.event_count if state is not None else 0
    state = apply_event(state, event, max_events)
    return state, state.event_count != before


class OnlineStateWriter:
    """Buffers feature rows and popularity increments; writes them in batches.

    `write_rows(rows)` and `incr_popularity([(key, item_id), ...])` do the I/O (Feast push and a Redis
    pipeline in the job, lists in tests). A batch goes out when it holds `max_rows` users or its oldest
    entry waited `max_delay_s`; the operator also flushes on timers and at close.
    """

    def __init__(
        self,
        write_rows: Callable[[list[dict[str, Any]]], None],
        incr_popularity: Callable[[list[tuple[str, str]]], None],
        max_rows: int = 500,
        max_delay_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_rows < 1 or max_delay_s < 0:
            raise ValueError(f"max_rows must be >= 1 and max_delay_s >= 0, got {max_rows}, {max_delay_s}")
        self.write_rows = write_rows
        self.incr_popularity = incr_popularity
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.clock = clock
        self.states: dict[str, UserState] = {}  # latest state per user; rows are built at flush
        self.popularity: list[tuple[str, str]] = []
        self.first_at: float | None = None
        self.rows_written = 0
        self.batches_written = 0

    def add(self, state: UserState, new_item: tuple[str, str] | None) -> None:
        """Queue the user's current state (replacing an older queued one) and a popularity bump.

        `state` must not be mutated afterwards (update_state builds a new one per event).
        """
        if self.first_at is None:
            self.first_at = self.clock()
        self.states[state.user_id] = state
        if new_item is not None:
            self.popularity.append(new_item)

    def due(self) -> bool:
        if self.first_at is None:
            return False
        return len(self.states) >= self.max_rows or self.clock() - self.first_at >= self.max_delay_s

    def pending(self) -> int:
        return len(self.states)

    def flush(self) -> int:
        """Write what is queued; returns the number of rows written."""
        rows = [state.to_feature_row() for state in self.states.values()]
        popularity = self.popularity
        self.states, self.popularity, self.first_at = {}, [], None
        if rows:
            self.write_rows(rows)
            self.rows_written += len(rows)
            self.batches_written += 1
        if popularity:
            self.incr_popularity(popularity)
        return len(rows)


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
    """Rows -> one `online_write_batch` of the store's provider, with the protos built here.

    Same Redis entries as `store.push` (the view's schema maps Array(String) / Array(Int64) / Int64 to these
    value types), at about half the cost: push converts every list element through pandas and pyarrow.
    Uses FeatureStore._get_provider(), an internal of the pinned feast 0.67.
    """
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Int64List, StringList, Value

    provider = store._get_provider()
    view = store.get_feature_view(feature_view)
    clock = MonotonicClock()

    def write(rows: list[dict[str, Any]]) -> None:
        now = clock()
        data = []
        for r in rows:
            key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=r["user_id"])])
            values = {
                "recent_item_ids": Value(string_list_val=StringList(val=r["recent_item_ids"])),
                "recent_action_tokens": Value(int64_list_val=Int64List(val=r["recent_action_tokens"])),
                "recent_rating_tokens": Value(int64_list_val=Int64List(val=r["recent_rating_tokens"])),
                "recent_event_times": Value(int64_list_val=Int64List(val=r["recent_event_times"])),
                "event_count": Value(int64_val=r["event_count"]),
                "last_event_time": Value(int64_val=r["last_event_time"]),
                "state_version": Value(int64_val=r["state_version"]),
            }
            data.append((key, values, now, None))
        provider.online_write_batch(store.config, view, data, None)

    return write


def redis_popularity_writer(client: Any) -> Callable[[list[tuple[str, str]]], None]:
    """Increments -> one Redis pipeline of ZINCRBY (aggregated per key and item first)."""

    def incr(items: list[tuple[str, str]]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for key_item in items:
            counts[key_item] = counts.get(key_item, 0) + 1
        with client.pipeline(transaction=False) as pipe:
            for (key, item), count in counts.items():
                pipe.zincrby(key, count, item)
            pipe.execute()

    return incr
