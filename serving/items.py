"""Item metadata for the reranker: each item's categories, read from Feast's ``item_metadata`` view in Redis.

The rules (filters, boosts, caps, diversity) need categories for every candidate; they change rarely, so
they are cached per item for ``ttl_s`` and the misses of one rerank are fetched in one pipelined round trip.
When Redis fails the reranker still answers: items without known categories match no rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import redis

from infra.feast_store import FeastRedisLayout, feature_field
from serving.feast_redis import UnsupportedValue, decode_typed

log = logging.getLogger(__name__)

ITEM_JOIN_KEY = "item_id"
ITEM_VIEW = "item_metadata"
MAX_CACHED = 1_000_000


class ItemCatalog:
    """``categories(ids)`` -> {id: categories}; cached, one Redis round trip per call for the misses."""

    def __init__(
        self,
        client: redis.Redis,
        layout: FeastRedisLayout,
        *,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.layout = layout
        self.ttl_s = ttl_s
        self.clock = clock
        self.field = feature_field(ITEM_VIEW, "categories")
        self._cache: dict[str, tuple[tuple[str, ...], float]] = {}
        self.fetches = 0

    @classmethod
    def from_repo(cls, client: redis.Redis, repo: Path) -> ItemCatalog:
        return cls(client, FeastRedisLayout.from_repo(repo))

    def categories(self, item_ids: Iterable[str]) -> dict[str, tuple[str, ...]]:
        now = self.clock()
        out: dict[str, tuple[str, ...]] = {}
        missing: list[str] = []
        for item_id in item_ids:
            hit = self._cache.get(item_id)
            if hit is not None and hit[1] > now:
                out[item_id] = hit[0]
            else:
                missing.append(item_id)
        if missing:
            fetched = self._fetch(missing)
            if len(self._cache) + len(fetched) > MAX_CACHED:
                self._cache.clear()
            for item_id, cats in fetched.items():
                self._cache[item_id] = (cats, now + self.ttl_s)
            out.update(fetched)
            for item_id in missing:
                out.setdefault(item_id, ())
        return out

    def _fetch(self, item_ids: list[str]) -> dict[str, tuple[str, ...]]:
        self.fetches += 1
        try:
            pipe = self.client.pipeline(transaction=False)
            for item_id in item_ids:
                pipe.hget(self.layout.entity_key(ITEM_JOIN_KEY, item_id), self.field)
            rows = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("item metadata unavailable (%s): reranking without categories", exc)
            return {}  # not cached: the next request tries again
        out: dict[str, tuple[str, ...]] = {}
        for item_id, raw in zip(item_ids, rows, strict=True):
            try:
                out[item_id] = tuple(decode_typed(raw, "string_list_val") or ())
            except (UnsupportedValue, ValueError) as exc:
                log.warning("item %r has unreadable categories: %s", item_id, exc)
                out[item_id] = ()
        return out
