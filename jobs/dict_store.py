"""user_state's keyed state over one dict, for the fold without Flink (bench/user_state_cost.py, tests)."""

from __future__ import annotations

from typing import Any


class DictKeyedStore:
    """The ``KeyedStore`` that ``jobs.user_state_logic.UserStateProcessor`` reads and writes (Flink's ValueStates
    and the log ListState), over one dict shared by all keys and scoped to ``user`` as Flink scopes keyed state to
    the current key. ``log_add`` builds a new list, so a log read earlier stays what it was (as Flink's copy)."""

    def __init__(self, data: dict | None = None, user: str = ""):
        self.data: dict[tuple[str, str], Any] = {} if data is None else data
        self.user = user

    def get(self) -> bytes | None:
        return self.data.get(("s", self.user))

    def put(self, value: bytes) -> None:
        self.data[("s", self.user)] = value

    def get_long(self) -> bytes | None:
        return self.data.get(("l", self.user))

    def put_long(self, value: bytes) -> None:
        self.data[("l", self.user)] = value

    def log_get(self) -> list[bytes] | None:
        return self.data.get(("log", self.user))

    def log_add(self, value: bytes) -> None:
        self.data[("log", self.user)] = [*self.data.get(("log", self.user), ()), value]

    def log_clear(self) -> None:
        self.data.pop(("log", self.user), None)
