"""The per-worker semantic-ID cache: batched fills, negative cache with a TTL, reload on an active-version flip."""

from __future__ import annotations

from contracts.redis_keys import ACTIVE_KEY, item_key
from jobs.sid_cache import SemanticIdCache


class FakeRedis:
    """The four commands the cache uses, over dicts; counts calls (the cache's whole point is few of them)."""

    def __init__(self):
        self.strings: dict[str, bytes] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.calls = 0

    def get(self, key):
        self.calls += 1
        return self.strings.get(key)

    def hscan(self, key, cursor, count=10):
        self.calls += 1
        items = sorted(self.hashes.get(key, {}).items())
        page = items[cursor:cursor + count]
        nxt = cursor + count if cursor + count < len(items) else 0
        return nxt, dict(page)

    def hmget(self, key, fields):
        self.calls += 1
        h = self.hashes.get(key, {})
        return [h.get(f.encode()) for f in fields]

    def put(self, version: str, item: str, code: str) -> None:
        self.hashes.setdefault(item_key(version), {})[item.encode()] = code.encode()


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def store(n: int = 25, version: str = "v1") -> FakeRedis:
    r = FakeRedis()
    r.strings[ACTIVE_KEY] = version.encode()
    for i in range(n):
        r.put(version, f"i{i}", f"{i % 4}-{i % 3}-{i}")
    return r


def test_preloads_the_active_version_in_pages_then_serves_from_memory():
    r, clock = store(25), Clock()
    cache = SemanticIdCache(r, scan_count=10, clock=clock)
    assert cache.version == "v1" and len(cache.known) == 25
    assert r.calls == 1 + 3  # GET active + three HSCAN pages
    before = r.calls
    for _ in range(1000):
        assert cache.get("i7") == (3, 1, 7)
    assert r.calls == before  # no round trip per event


def test_unknown_item_is_asked_once_per_ttl_and_found_when_written():
    r, clock = store(3), Clock()
    cache = SemanticIdCache(r, negative_ttl_s=5.0, check_every_s=1000, clock=clock)
    base = r.calls
    assert cache.get("new") is None
    assert cache.get("new") is None and r.calls == base + 1  # remembered miss
    r.put("v1", "new", "1-2-0")
    clock.t += 4.0
    assert cache.get("new") is None and r.calls == base + 1
    clock.t += 1.5
    assert cache.get("new") == (1, 2, 0) and r.calls == base + 2
    assert cache.get("new") == (1, 2, 0) and r.calls == base + 2


def test_get_many_fetches_all_misses_in_one_hmget():
    r, clock = store(0), Clock()
    cache = SemanticIdCache(r, preload=False, check_every_s=1000, clock=clock)
    for i in range(10):
        r.put("v1", f"x{i}", f"{i}-0")
    base = r.calls
    got = cache.get_many([f"x{i}" for i in range(10)] + ["nope", "x1"])
    assert r.calls == base + 1
    assert got["x3"] == (3, 0) and got["nope"] is None and len(got) == 11


def test_follows_an_active_version_flip_and_drops_the_old_map():
    r, clock = store(5, "v1"), Clock()
    r.put("v2", "i1", "9-9-0")
    cache = SemanticIdCache(r, check_every_s=1.0, clock=clock)
    assert cache.get("i1") == (1, 1, 1)
    r.strings[ACTIVE_KEY] = b"v2"
    clock.t += 0.5
    assert cache.get("i1") == (1, 1, 1)  # not checked yet: at most one GET per check_every_s
    clock.t += 0.6
    assert cache.get("i1") == (9, 9, 0) and cache.version == "v2"
    assert cache.get("i2") is None  # only in v1


def test_pinned_version_never_reads_the_pointer_and_no_version_means_none():
    r, clock = store(5, "v1"), Clock()
    r.put("v0", "i1", "5-5-5")
    pinned = SemanticIdCache(r, version="v0", clock=clock)
    clock.t += 100
    assert pinned.get("i1") == (5, 5, 5) and pinned.get("i2") is None
    empty = FakeRedis()
    cache = SemanticIdCache(empty, clock=clock)
    assert cache.version is None and cache.get("i1") is None and empty.calls == 1
