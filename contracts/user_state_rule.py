"""Per-user state: the pure rules shared by the Flink job, serving and tests (real-time + nearline).

Real time: the ``user_state`` job calls :func:`apply_event` for every tokenized event. The recent window
(``max_events`` events, sorted by event time, then event id) is idempotent within the window (a repeated
event id changes nothing). Bounded lateness: an event older than the user's newest applied event minus
``allowed_lateness_ms`` is rejected as LATE_EVENT. The rule depends on per-user arrival order, which Kafka
keeps (events.tokens is keyed by user), so the offline reference (:func:`states_from_events`) folds the
same function over the same events in the same per-user order and the two agree exactly.

Nearline: events pushed out of the recent window are "spilled"; every few minutes :func:`compact` folds the
spill into the long-term history, as the seed's ``compress_history``: early behaviour coarse, recent fine.
Each spilled event becomes a group of one; when more than ``per_level`` groups share a level the two oldest
of that level merge into one of the next level (an exponential histogram), and beyond ``max_groups`` the
two oldest groups merge. The fold is one event at a time, so the result does not depend on when the
compaction timers fired, only on the events (what lets online == offline hold for it too).

Layout versioning: :data:`STATE_VERSION` is written into every feature row (``state_version``) and leads
every encoded state blob (:func:`encode_state`); a reader refuses a version it does not know.
"""

from __future__ import annotations

import bisect
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from contracts.tokenizer import ACTIONS, TokenizedEvent

STATE_VERSION = 2  # 2: lateness, spill + long-term groups, counts, last context, popularity origin
DEFAULT_MAX_EVENTS = 200  # HSTU's ML-1M max sequence length
DEFAULT_MAX_GROUPS = 16  # long-term groups (the model's MultiScaleConfig.long_groups)
DEFAULT_PER_LEVEL = 2  # groups of one level before the two oldest merge
ITEMS_PER_GROUP = 4  # newest item ids a long-term group keeps

APPLIED, DUPLICATE, LATE = "applied", "duplicate", "late"

# Feature names of the Feast `user_recent_events` view (real time); serving reads these.
FEATURE_NAMES: tuple[str, ...] = (
    "recent_item_ids",
    "recent_action_tokens",
    "recent_rating_tokens",
    "recent_event_times",
    "event_count",
    "last_event_time",
    "state_version",
)

LONG_TERM_VIEW = "user_long_term"
# Feature names of the Feast `user_long_term` view (nearline, written on each compaction).
LONG_TERM_FEATURE_NAMES: tuple[str, ...] = (
    "long_group_counts",  # events per group, oldest group first
    "long_group_first_times",  # epoch ms of each group's oldest event
    "long_group_last_times",  # epoch ms of each group's newest event
    "long_group_rating_sums",  # sum of rating tokens per group (mean = sum / count)
    "long_group_item_ids",  # per group its newest min(count, ITEMS_PER_GROUP) item ids, groups concatenated
    "action_counts",  # applied events per action token (index = contracts.tokenizer ACTIONS)
    "last_context_tokens",  # context tokens of the newest event
    "last_hour_token",
    "last_domain",
    "compacted_event_count",  # event_count the compaction saw
    "state_version",
)


@dataclass
class UserState:
    user_id: str
    event_keys: list[tuple[int, str]] = field(default_factory=list)  # (event_time, event_id), sorted
    item_ids: list[str] = field(default_factory=list)
    action_tokens: list[int] = field(default_factory=list)
    rating_tokens: list[int] = field(default_factory=list)
    event_count: int = 0
    origin: str = ""  # event id of the first applied event: names this incarnation of the state
    spill_times: list[int] = field(default_factory=list)  # evicted since the last compaction, in eviction order
    spill_items: list[str] = field(default_factory=list)
    spill_ratings: list[int] = field(default_factory=list)
    action_counts: list[int] = field(default_factory=lambda: [0] * len(ACTIONS))
    last_context_tokens: list[int] = field(default_factory=list)
    last_hour_token: int = 0
    last_domain: str = ""

    @property
    def event_times(self) -> list[int]:
        return [t for t, _ in self.event_keys]

    @property
    def last_event_time(self) -> int:
        return self.event_keys[-1][0] if self.event_keys else 0

    def to_feature_row(self) -> dict[str, Any]:
        """The row of the `user_recent_events` view (entity key `user_id` plus FEATURE_NAMES)."""
        return {
            "user_id": self.user_id,
            "recent_item_ids": list(self.item_ids),
            "recent_action_tokens": list(self.action_tokens),
            "recent_rating_tokens": list(self.rating_tokens),
            "recent_event_times": self.event_times,
            "event_count": self.event_count,
            "last_event_time": self.last_event_time,
            "state_version": STATE_VERSION,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON-able); Flink keeps :func:`encode_state` instead (cheaper)."""
        return {"state_version": STATE_VERSION, **{k: getattr(self, k) for k in _FIELDS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UserState:
        _check_version(data.get("state_version"))
        values = {k: data[k] for k in _FIELDS if k in data}
        values["event_keys"] = [(int(t), str(e)) for t, e in data["event_keys"]]
        return cls(**values)


_FIELDS = tuple(UserState.__dataclass_fields__)


class StateVersionError(ValueError):
    """A stored state was written by another layout version; say which, never guess."""


def _check_version(version: Any) -> None:
    if version != STATE_VERSION:
        raise StateVersionError(f"user state layout version {version!r}, this code reads {STATE_VERSION} "
                                "(contracts.user_state_rule.STATE_VERSION); rebuild the state from the events")


def encode_state(state: UserState, extra: tuple = ()) -> bytes:
    """The state as bytes for Flink keyed state: a version, then flat lists (no per-event tuples).

    `extra` is the job's own bookkeeping, stored beside the state (read back by decode_state(with_extra=True)).
    """
    times = [t for t, _ in state.event_keys]
    ids = [e for _, e in state.event_keys]
    return pickle.dumps(
        (STATE_VERSION, state.user_id, times, ids, state.item_ids, state.action_tokens, state.rating_tokens,
         state.event_count, state.origin, state.spill_times, state.spill_items, state.spill_ratings,
         state.action_counts, state.last_context_tokens, state.last_hour_token, state.last_domain, extra),
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def decode_state(data: bytes, with_extra: bool = False) -> Any:
    """Inverse of :func:`encode_state`: the state, or (state, extra) with `with_extra`.

    StateVersionError for another layout version.
    """
    values = pickle.loads(data)
    _check_version(values[0])
    (_, user_id, times, ids, items, actions, ratings, count, origin, s_times, s_items, s_ratings, a_counts,
     context, hour, domain, extra) = values
    state = UserState(user_id, list(zip(times, ids, strict=True)), items, actions, ratings, count, origin, s_times,
                      s_items, s_ratings, a_counts, context, hour, domain)
    return (state, extra) if with_extra else state


def classify(state: UserState | None, event: TokenizedEvent, allowed_lateness_ms: int | None) -> str:
    """APPLIED (new), DUPLICATE (already in the window) or LATE (older than newest - allowed lateness)."""
    if state is None or not state.event_keys:
        return APPLIED
    key = (event.event_time, event.event_id)
    keys = state.event_keys
    position = bisect.bisect_left(keys, key)
    if position < len(keys) and keys[position] == key:
        return DUPLICATE
    if allowed_lateness_ms is not None and event.event_time < keys[-1][0] - allowed_lateness_ms:
        return LATE
    return APPLIED


def apply_event(
    state: UserState | None,
    event: TokenizedEvent,
    max_events: int = DEFAULT_MAX_EVENTS,
    allowed_lateness_ms: int | None = None,
) -> UserState:
    """Return the state after ``event`` (the same object, updated in place); see :func:`apply_checked`."""
    return apply_checked(state, event, max_events, allowed_lateness_ms)[0]


def apply_checked(
    state: UserState | None,
    event: TokenizedEvent,
    max_events: int = DEFAULT_MAX_EVENTS,
    allowed_lateness_ms: int | None = None,
) -> tuple[UserState, str]:
    """(state, outcome): the event is applied only when :func:`classify` says APPLIED."""
    outcome = classify(state, event, allowed_lateness_ms)
    if state is None:
        state = UserState(user_id=event.user_id)
    if outcome != APPLIED:
        return state, outcome
    if not state.origin:
        state.origin = event.event_id
    key = (event.event_time, event.event_id)
    keys = state.event_keys
    position = bisect.bisect_left(keys, key)
    state.event_count += 1
    keys.insert(position, key)
    state.item_ids.insert(position, event.item_id)
    state.action_tokens.insert(position, event.action_token)
    state.rating_tokens.insert(position, event.rating_token)
    if 0 <= event.action_token < len(state.action_counts):
        state.action_counts[event.action_token] += 1
    if position == len(keys) - 1:  # the newest event by event time carries the last context
        state.last_context_tokens = list(event.context_tokens)
        state.last_hour_token = event.hour_token
        state.last_domain = event.domain
    overflow = len(keys) - max_events
    if overflow > 0:
        state.spill_times.extend(t for t, _ in keys[:overflow])
        state.spill_items.extend(state.item_ids[:overflow])
        state.spill_ratings.extend(state.rating_tokens[:overflow])
        del keys[:overflow]
        del state.item_ids[:overflow]
        del state.action_tokens[:overflow]
        del state.rating_tokens[:overflow]
    return state, APPLIED


# ---------------------------------------------------------------------------------------------------------
# nearline: long-term compaction
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LongTermState:
    """The compacted long-term history: groups oldest first, each [level, count, first_t, last_t, rating_sum, items]."""

    groups: list[list[Any]] = field(default_factory=list)

    def encode(self) -> bytes:
        return pickle.dumps((STATE_VERSION, self.groups), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def decode(cls, data: bytes) -> LongTermState:
        version, groups = pickle.loads(data)
        _check_version(version)
        return cls(groups)


def _merge(a: list[Any], b: list[Any], level: int, items_per_group: int) -> list[Any]:
    """Group a (older) + group b (newer) -> one group of `level`."""
    return [level, a[1] + b[1], min(a[2], b[2]), max(a[3], b[3]), a[4] + b[4], (a[5] + b[5])[-items_per_group:]]


def fold_event(
    groups: list[list[Any]], time_ms: int, item_id: str, rating: int,
    max_groups: int = DEFAULT_MAX_GROUPS, per_level: int = DEFAULT_PER_LEVEL, items_per_group: int = ITEMS_PER_GROUP,
) -> None:
    """Add one evicted event to the groups (in place): a new finest group, then merges up the levels."""
    groups.append([0, 1, time_ms, time_ms, rating, [item_id]])
    level = 0
    while True:
        same = [i for i, g in enumerate(groups) if g[0] == level]
        if len(same) <= per_level:
            break
        i, j = same[0], same[1]  # the two oldest of this level (levels never increase toward the present)
        groups[i:j + 1] = [_merge(groups[i], groups[j], level + 1, items_per_group)]
        level += 1
    while len(groups) > max_groups:
        a, b = groups[0], groups[1]
        groups[0:2] = [_merge(a, b, max(a[0], b[0]) + 1, items_per_group)]


def compact(
    long_term: LongTermState | None, state: UserState,
    max_groups: int = DEFAULT_MAX_GROUPS, per_level: int = DEFAULT_PER_LEVEL,
) -> LongTermState:
    """Fold the state's spill into the long-term groups (the nearline step); empties the spill."""
    long_term = long_term if long_term is not None else LongTermState()
    for t, item, rating in zip(state.spill_times, state.spill_items, state.spill_ratings, strict=True):
        fold_event(long_term.groups, t, item, rating, max_groups, per_level)
    state.spill_times, state.spill_items, state.spill_ratings = [], [], []
    return long_term


def long_term_row(long_term: LongTermState, state: UserState) -> dict[str, Any]:
    """The row of the `user_long_term` view (entity key `user_id` plus LONG_TERM_FEATURE_NAMES)."""
    groups = long_term.groups
    return {
        "user_id": state.user_id,
        "long_group_counts": [g[1] for g in groups],
        "long_group_first_times": [g[2] for g in groups],
        "long_group_last_times": [g[3] for g in groups],
        "long_group_rating_sums": [g[4] for g in groups],
        "long_group_item_ids": [item for g in groups for item in g[5]],
        "action_counts": list(state.action_counts),
        "last_context_tokens": list(state.last_context_tokens),
        "last_hour_token": state.last_hour_token,
        "last_domain": state.last_domain,
        "compacted_event_count": state.event_count,
        "state_version": STATE_VERSION,
    }


# ---------------------------------------------------------------------------------------------------------
# the offline reference
# ---------------------------------------------------------------------------------------------------------
def fold_events(
    events: Iterable[TokenizedEvent], max_events: int = DEFAULT_MAX_EVENTS, allowed_lateness_ms: int | None = None,
) -> tuple[dict[str, UserState], list[TokenizedEvent]]:
    """(states per user, late events): :func:`apply_checked` over events in their (per-user) order."""
    states: dict[str, UserState] = {}
    late: list[TokenizedEvent] = []
    for event in events:
        state, outcome = apply_checked(states.get(event.user_id), event, max_events, allowed_lateness_ms)
        states[event.user_id] = state
        if outcome == LATE:
            late.append(event)
    return states, late


def states_from_events(
    events: Iterable[TokenizedEvent], max_events: int = DEFAULT_MAX_EVENTS, allowed_lateness_ms: int | None = None,
) -> dict[str, UserState]:
    """The offline reference of the real-time path: fold :func:`apply_event` over events, per user."""
    return fold_events(events, max_events, allowed_lateness_ms)[0]


def long_term_rows_from_events(
    events: Iterable[TokenizedEvent], max_events: int = DEFAULT_MAX_EVENTS, allowed_lateness_ms: int | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS, per_level: int = DEFAULT_PER_LEVEL,
) -> dict[str, dict[str, Any]]:
    """The offline reference of the nearline path: the long-term row of each user once all is compacted."""
    states = states_from_events(events, max_events, allowed_lateness_ms)
    return {u: long_term_row(compact(None, s, max_groups, per_level), s) for u, s in states.items()}
