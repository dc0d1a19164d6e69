"""The popularity writer lays out one Lua call per domain the way POPULARITY_SCRIPT reads it (KEYS, then ARGV)."""

from __future__ import annotations

from typing import Any

from contracts.redis_keys import applied_key, popularity_key
from jobs.popularity_writer import POPULARITY_SCRIPT, redis_popularity_writer


class RecordingClient:
    """Stands in for redis.Redis: keeps the registered script and every call made through it."""

    def __init__(self) -> None:
        self.script = ""
        self.calls: list[tuple[list[str], list[Any]]] = []

    def register_script(self, script: str):
        self.script = script
        return lambda keys, args: self.calls.append((keys, args))


def test_one_call_per_domain_with_each_users_origin_and_sequence_numbers() -> None:
    client = RecordingClient()
    incr = redis_popularity_writer(client, ttl_s=60)
    incr({"movie": {"u1": ("e1", [(3, "i9"), (4, "i7")]), "u2": ("e5", [(1, "i9")])},
          "book": {"u1": ("e1", [(2, "b1")])}})
    assert client.script == POPULARITY_SCRIPT
    assert client.calls == [
        ([popularity_key("movie"), applied_key("movie", "u1"), applied_key("movie", "u2")],
         [60, "e1", 2, 3, "i9", 4, "i7", "e5", 1, 1, "i9"]),
        ([popularity_key("book"), applied_key("book", "u1")], [60, "e1", 1, 2, "b1"]),
    ]
