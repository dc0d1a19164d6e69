"""Per-user recent-event state: the pure update rule shared by the Flink job, serving and tests.

The ``user_state`` job calls :func:`apply_event` for every tokenized event; the offline
reference (:func:`states_from_events`) folds the same function over the same events, so the
two agree exactly. The rule is order-independent (events are kept sorted by event time, then
event id) and idempotent within the window (a repeated event id changes nothing), so Kafka
partitioning, replays and parallelism do not change the result.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from models.tokenizer import TokenizedEvent

STATE_VERSION = 1
DEFAULT_MAX_EVENTS = 200  # HSTU's ML-1M max sequence length

# Feature names of the Feast `user_recent_events` view; serving reads these.
FEATURE_NAMES: tuple[str, ...] = (
    "recent_item_ids",
    "recent_action_tokens",
    "recent_rating_tokens",
    "recent_event_times",
    "event_count",
    "last_event_time",
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

    @property
    def event_times(self) -> list[int]:
        return [t for t, _ in self.event_keys]

    @property
    def last_event_time(self) -> int:
        return self.event_keys[-1][0] if self.event_keys else 0

    def to_feature_row(self) -> dict[str, Any]:
        """The row pushed to Feast (entity key `user_id` plus FEATURE_NAMES)."""
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
        """Compact form for Flink keyed state (plain lists, picklable, JSON-able)."""
        return {
            "user_id": self.user_id,
            "event_keys": [list(k) for k in self.event_keys],
            "item_ids": self.item_ids,
            "action_tokens": self.action_tokens,
            "rating_tokens": self.rating_tokens,
            "event_count": self.event_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserState:
        return cls(
            user_id=data["user_id"],
            event_keys=[(int(t), str(e)) for t, e in data["event_keys"]],
            item_ids=list(data["item_ids"]),
            action_tokens=list(data["action_tokens"]),
            rating_tokens=list(data["rating_tokens"]),
            event_count=int(data["event_count"]),
        )


def apply_event(state: UserState | None, event: TokenizedEvent, max_events: int = DEFAULT_MAX_EVENTS) -> UserState:
    """Return the state after ``event``; returns the same object, updated in place."""
    if state is None:
        state = UserState(user_id=event.user_id)
    key = (event.event_time, event.event_id)
    position = bisect.bisect_left(state.event_keys, key)
    if position < len(state.event_keys) and state.event_keys[position] == key:
        return state  # already applied: idempotent
    state.event_count += 1
    state.event_keys.insert(position, key)
    state.item_ids.insert(position, event.item_id)
    state.action_tokens.insert(position, event.action_token)
    state.rating_tokens.insert(position, event.rating_token)
    overflow = len(state.event_keys) - max_events
    if overflow > 0:
        del state.event_keys[:overflow]
        del state.item_ids[:overflow]
        del state.action_tokens[:overflow]
        del state.rating_tokens[:overflow]
    return state


def states_from_events(
    events: Iterable[TokenizedEvent], max_events: int = DEFAULT_MAX_EVENTS
) -> dict[str, UserState]:
    """The offline reference: fold :func:`apply_event` over events, per user."""
    states: dict[str, UserState] = {}
    for event in events:
        states[event.user_id] = apply_event(states.get(event.user_id), event, max_events)
    return states
