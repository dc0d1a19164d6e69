"""A per-worker cache of the semantic-ID store, so tokenizing an event costs no Redis round trip.

The item_semantic_ids job writes ``HSET ugt:sid:item:<version> <item_id> "l1-l2-...-dedup"`` and a backfill
flips ``ugt:sid:active`` to a new version once its map is complete. This cache:

* follows the active version (or stays on a pinned one): it re-reads the pointer at most every
  ``check_every_s`` seconds, and on a change drops everything and reloads;
* fills itself in batches: the whole map with HSCAN when the version is (re)loaded (``preload``, the
  default: MovieLens-sized catalogs are a few thousand entries), then HMGET for items it has not seen;
* remembers misses for ``negative_ttl_s`` seconds, so a stream of events of one unknown item costs one
  lookup per TTL, while a brand-new item becomes known within that TTL of its ID being written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from contracts.redis_keys import ACTIVE_KEY, item_key, parse_code

Levels = tuple[int, ...]
MAX_REMEMBERED_MISSES = 100_000


class SemanticIdCache:
    """item_id -> semantic-ID levels of the active (or pinned) version; ``None`` for an item the store lacks."""

    def __init__(
        self, client: Any, version: str | None = None, negative_ttl_s: float = 5.0, check_every_s: float = 1.0,
        preload: bool = True, scan_count: int = 10_000, clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.pinned = version or None
        self.negative_ttl_s = negative_ttl_s
        self.check_every_s = check_every_s
        self.preload = preload
        self.scan_count = scan_count
        self.clock = clock
        self.version: str | None = None
        self.known: dict[str, Levels] = {}
        self.missing: dict[str, float] = {}  # item -> when the miss may be asked again
        self.round_trips = 0
        self._next_check = 0.0
        self.refresh(force=True)

    def _active(self) -> str | None:
        self.round_trips += 1
        value = self.client.get(ACTIVE_KEY)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def refresh(self, force: bool = False) -> None:
        """Re-read the active version when it is due (or forced); reload the map if it changed."""
        now = self.clock()
        if not force and (self.pinned or now < self._next_check):
            return
        self._next_check = now + self.check_every_s
        version = self.pinned or self._active()
        if version == self.version and not force:
            return
        self.version = version
        self.known = {}
        self.missing = {}
        if version and self.preload:
            self._load_all(version)

    def _load_all(self, version: str) -> None:
        cursor: int = 0
        key = item_key(version)
        while True:
            self.round_trips += 1
            cursor, batch = self.client.hscan(key, cursor, count=self.scan_count)
            for item, code in batch.items():
                self.known[item.decode() if isinstance(item, bytes) else item] = parse_code(code)
            if int(cursor) == 0:
                return

    def get(self, item_id: str) -> Levels | None:
        """The item's levels, or None when the store has none (or no version is active)."""
        self.refresh()
        levels = self.known.get(item_id)
        if levels is not None or self.version is None:
            return levels
        return self.get_many((item_id,)).get(item_id)

    def get_many(self, item_ids: Iterable[str]) -> dict[str, Levels | None]:
        """Levels of several items, with one HMGET for all the ones not cached (and not recently missed)."""
        self.refresh()
        out: dict[str, Levels | None] = {}
        ask: list[str] = []
        now = self.clock()
        for item in item_ids:
            levels = self.known.get(item)
            out[item] = levels
            if levels is None and self.version is not None and self.missing.get(item, 0.0) <= now and item not in ask:
                ask.append(item)
        if ask:
            self.round_trips += 1
            codes = self.client.hmget(item_key(self.version), ask)
            retry_at = now + self.negative_ttl_s
            if len(self.missing) > MAX_REMEMBERED_MISSES:  # a flood of distinct unknown ids must not grow it
                self.missing = {k: t for k, t in self.missing.items() if t > now}
                if len(self.missing) > MAX_REMEMBERED_MISSES:
                    self.missing = {}
            for item, code in zip(ask, codes, strict=True):
                if code is None:
                    self.missing[item] = retry_at
                else:
                    self.known[item] = out[item] = parse_code(code)
                    self.missing.pop(item, None)
        return out
