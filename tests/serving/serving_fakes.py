"""Fakes of serving's I/O edges (state store, Redis ZSET, clock) for the unit tests of the pure logic."""

from __future__ import annotations

import redis

from contracts.user_state_rule import STATE_VERSION
from serving.user_state_reader import StateUnavailable, UserStateView


def view(user_id: str, item_ids: list[str]) -> UserStateView:
    n = len(item_ids)
    return UserStateView(
        user_id=user_id,
        item_ids=tuple(item_ids),
        action_tokens=(2,) * n,
        rating_tokens=(8,) * n,
        event_times=tuple(range(1000, 1000 + n)),
        event_count=n,
        last_event_time=999 + n,
        state_version=STATE_VERSION,
    )


class FakeStateReader:
    name = "fake"

    def __init__(self, states: dict[str, UserStateView] | None = None, error: Exception | None = None):
        self.states = states or {}
        self.error = error
        self.reads = 0

    def read(self, user_id: str) -> UserStateView | None:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.states.get(user_id)

    def check(self) -> str:
        if self.error is not None:
            raise StateUnavailable(str(self.error))
        return "fake store"


class FakeZsetRedis:
    """zrevrange over in-memory sorted sets; `down = True` makes every call fail like a dead Redis."""

    def __init__(self, sets: dict[str, dict[str, float]] | None = None):
        self.sets = {key: dict(members) for key, members in (sets or {}).items()}  # tests mutate their copy
        self.down = False
        self.calls = 0

    def zrevrange(self, key: str, start: int, end: int, withscores: bool = False):
        self.calls += 1
        if self.down:
            raise redis.ConnectionError("Connection refused")
        members = sorted(self.sets.get(key, {}).items(), key=lambda kv: (-kv[1], kv[0]))
        rows = [(m.encode(), s) for m, s in members[start : end + 1]]
        return rows if withscores else [m for m, _ in rows]

    def scan_iter(self, match: str, count: int = 1000):
        prefix = match.rstrip("*")
        return [k.encode() for k in self.sets if k.startswith(prefix)]

    def ping(self) -> bool:
        if self.down:
            raise redis.ConnectionError("Connection refused")
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
