"""PopularityFallback: the answer that is always there when the model cannot answer; PopularityGenerator: the
walking skeleton's model, the same ranking with the user's history excluded.

The ``user_state`` job keeps ``ugt:popularity:<domain>`` (a Redis ZSET, +1 per event) current, so "popular"
follows the stream. The top of that set is cached per domain and re-read at most once per
``refresh_interval_s``; when Redis fails the last good list keeps serving, and without one the popularity
JSON file named in the config does. Items in the user's history or the request's exclude list are never returned.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import redis

from serving.generator import ScoredItem
from serving.user_state_reader import UserStateView

log = logging.getLogger(__name__)

FILE_FORMAT_VERSION = 1


class NoPopularity(Exception):
    """Neither Redis, the cached list nor the file has popular items for the domain.

    ``settled``: every source was asked and none has the domain (Redis answered or is not configured, the file
    lacks it), so the domain is unknown here; False when Redis could not be asked and the domain may exist.
    """

    def __init__(self, message: str, *, settled: bool = False):
        super().__init__(message)
        self.settled = settled  # kept by pickle (the engine process sends it): BaseException pickles __dict__


@dataclass(frozen=True)
class PopularityAnswer:
    items: list[ScoredItem]
    source: str  # "redis" (fresh), "redis_stale" (last good list, Redis failing) or "file"


@dataclass
class _Entry:
    items: tuple[ScoredItem, ...] = ()
    attempted_at: float = float("-inf")
    ok: bool = False
    error: str = ""


def load_popularity_file(path: str | Path) -> dict[str, tuple[ScoredItem, ...]]:
    """Parse ``{"version": 1, "domains": {"<domain>": [{"item_id": str, "score": number}, ...]}}``.

    Lists are sorted by score (descending, then item id) and de-duplicated, so a hand-written file
    behaves like the Redis set. Raises ValueError naming what is wrong.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"popularity file {str(path)!r} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise ValueError(f"popularity file {str(path)!r} must be an object with a 'domains' object")
    if data.get("version", FILE_FORMAT_VERSION) != FILE_FORMAT_VERSION:
        raise ValueError(f"popularity file {str(path)!r} has version {data.get('version')!r}, expected 1")
    out: dict[str, tuple[ScoredItem, ...]] = {}
    for domain, rows in data["domains"].items():
        if not isinstance(rows, list):
            raise ValueError(f"popularity file {str(path)!r}: domains.{domain} must be a list")
        best: dict[str, float] = {}
        for i, row in enumerate(rows):
            item_id = row.get("item_id") if isinstance(row, dict) else None
            score = row.get("score") if isinstance(row, dict) else None
            if (
                not isinstance(item_id, str)
                or not item_id
                or isinstance(score, bool)
                or not isinstance(score, (int, float))
            ):
                raise ValueError(
                    f"popularity file {str(path)!r}: domains.{domain}[{i}] must be "
                    f'{{"item_id": non-empty string, "score": number}}, got {row!r}'
                )
            best[item_id] = max(float(score), best.get(item_id, float("-inf")))
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
        out[domain] = tuple(ScoredItem(item_id, score) for item_id, score in ranked)
    return out


def write_popularity_file(path: str | Path, ranked: Mapping[str, Sequence[ScoredItem]]) -> None:
    """Write the file :func:`load_popularity_file` reads (e.g. a snapshot of the Redis sets)."""
    data = {
        "version": FILE_FORMAT_VERSION,
        "domains": {
            d: [{"item_id": s.item_id, "score": s.score} for s in items] for d, items in ranked.items()
        },
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


class PopularityFallback:
    """Top items per domain from Redis (cached, rate-limited), else the last good list, else the file."""

    name = "popularity-fallback"
    version = "v1"

    def __init__(
        self,
        client: redis.Redis | None,
        file_items: Mapping[str, Sequence[ScoredItem]] | None = None,
        *,
        key_prefix: str = "ugt:popularity:",
        cache_size: int = 2500,
        refresh_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.file_items = {d: tuple(items) for d, items in (file_items or {}).items()}
        self.key_prefix = key_prefix
        self.cache_size = cache_size
        self.refresh_interval_s = refresh_interval_s
        self.clock = clock
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.observer: Callable[[str], None] | None = None  # told each answer's source (metrics)

    def key(self, domain: str) -> str:
        return f"{self.key_prefix}{domain}"

    def _refresh(self, domain: str, entry: _Entry, now: float) -> None:
        entry.attempted_at = now
        if self.client is None:
            entry.ok, entry.error = False, "no Redis client configured"
            return
        try:
            rows = self.client.zrevrange(self.key(domain), 0, self.cache_size - 1, withscores=True)
        except (redis.RedisError, OSError) as exc:
            if entry.ok:
                log.warning("popularity refresh for %r failed, serving the last good list: %s", domain, exc)
            entry.ok, entry.error = False, str(exc)
            return
        entry.items = tuple(
            ScoredItem(m.decode() if isinstance(m, bytes) else str(m), float(s)) for m, s in rows
        )
        entry.ok, entry.error = True, ""

    def ranking(self, domain: str) -> tuple[tuple[ScoredItem, ...], str]:
        """The domain's popularity list and where it came from; raises NoPopularity."""
        now = self.clock()
        entry = self._cache.get(domain)
        if entry is None or now - entry.attempted_at >= self.refresh_interval_s:
            # One thread refreshes; others keep using the current list rather than queue behind a slow Redis.
            if self._lock.acquire(blocking=entry is None):
                try:
                    entry = self._cache.setdefault(domain, _Entry())
                    if now - entry.attempted_at >= self.refresh_interval_s:
                        self._refresh(domain, entry, now)
                finally:
                    self._lock.release()
        if entry.items:
            return entry.items, "redis" if entry.ok else "redis_stale"
        if self.file_items.get(domain):
            return self.file_items[domain], "file"
        redis_part = "is empty" if entry.ok else f"is unreachable ({entry.error})"
        file_part = "has no such domain" if self.file_items else "is not configured"
        raise NoPopularity(
            f"no popular items for domain {domain!r}: Redis {self.key(domain)} {redis_part} "
            f"and the popularity file {file_part}",
            settled=entry.ok or self.client is None,
        )

    def known_domains(self) -> list[str]:
        """The domains this fallback has popular items for so far: the file's, and Redis's lists read since start.

        Redis is not scanned for them (SCAN walks every key of the store, users included): a domain whose list
        exists is found by asking for it.
        """
        known = {domain for domain, items in self.file_items.items() if items}
        known.update(domain for domain, entry in list(self._cache.items()) if entry.items)
        return sorted(known)

    def recommend(self, domain: str, k: int, exclude: Set[str]) -> PopularityAnswer:
        """The ``k`` most popular items of ``domain`` not in ``exclude``; raises NoPopularity."""
        ranked, source = self.ranking(domain)
        if self.observer is not None:
            self.observer(source)
        items: list[ScoredItem] = []
        for item in ranked:
            if item.item_id not in exclude:
                items.append(item)
                if len(items) == k:
                    break
        return PopularityAnswer(items, source)

    def snapshot(self) -> dict[str, tuple[ScoredItem, ...]]:
        """Every ``<prefix>*`` set in Redis, read now (for writing a popularity file)."""
        if self.client is None:
            raise NoPopularity("no Redis client configured")
        out: dict[str, tuple[ScoredItem, ...]] = {}
        for key in self.client.scan_iter(match=f"{self.key_prefix}*", count=1000):
            key = key.decode() if isinstance(key, bytes) else key
            domain = key[len(self.key_prefix) :]
            entry = _Entry()
            self._refresh(domain, entry, self.clock())
            out[domain] = entry.items
        return out


class PopularityGenerator:
    """The walking skeleton's main model: the domain's most popular items the user has not seen.

    It applies the user's state (their history is excluded), which is what separates it from the
    fallback answer for a user without state; the ranking itself is shared with PopularityFallback.
    """

    name = "popularity"

    def __init__(self, popularity: PopularityFallback, version: str = "v1"):
        self.popularity = popularity
        self.version = version

    def recommend(self, state: UserStateView, k: int, exclude: Set[str], *, domain: str) -> list[ScoredItem]:
        seen = set(exclude)
        seen.update(state.item_ids)
        return self.popularity.recommend(domain, k, seen).items
