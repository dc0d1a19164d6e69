"""The dedup level: a last code that makes every item's semantic ID unique.

Items whose L quantized codes (the *prefix*) coincide get dedup index 0, 1, 2, ... within that prefix
(TIGER's scheme), so the dedup token is 0 for most items and carries no noise.

Rule (the one pure function every path uses, :func:`first_free`): an item's dedup index is the lowest index
not yet taken under its prefix. Indices are never freed (a deleted item's ID is not reused, so stale
recommendations can't point to a different item).

* Offline (:func:`assign_dedup`): items are allocated in sorted ``(prefix, item_id)`` order, so the result
  depends only on the set of (item_id, prefix) pairs: deterministic, whatever the input order.
* New items online: a :class:`DedupStore` does the one atomic step "return this item's index under this
  prefix if it has one, else claim ``first_free``". Being idempotent per item id, a replayed item event
  (Flink restarting from a checkpoint) gets the index it got before, never a second one.

Keeping parallel instances collision-free, two ways (both tested):
  1. Shared atomic store: every worker calls the same store; :class:`RedisDedupStore` does the step in one Lua
     script (Redis runs scripts atomically; one hash per prefix, so it also works on Redis Cluster).
  2. Partition by prefix: Flink ``key_by(prefix_key(prefix))`` sends all new items of a prefix to one
     parallel instance, which keeps that prefix's taken set in keyed state (:class:`InMemoryDedupStore`
     semantics). Instances own disjoint prefixes, so they never need to coordinate.
Every store is seeded with the artifact's offline table, so new items never take an index an existing
item holds.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Container, Iterable, Sequence

import numpy as np

from contracts.redis_keys import code_string


class DedupOverflowError(RuntimeError):
    """More items share one prefix than the dedup level has room for."""


def prefix_key(prefix: Sequence[int]) -> str:
    """Stable text key of a code prefix ("12-7-201"); used for store keys and Flink key_by."""
    return code_string(prefix)


def first_free(taken: Container[int], capacity: int) -> int:
    """The lowest index in ``[0, capacity)`` not in ``taken``; raises when the prefix is full."""
    for index in range(capacity):
        if index not in taken:
            return index
    raise DedupOverflowError(
        f"all {capacity} dedup indices of this prefix are taken; raise dedup_size or the codebook sizes"
    )


def assign_dedup(prefixes: np.ndarray, item_ids: Sequence[str], capacity: int) -> np.ndarray:
    """Offline: dedup index for every item of a catalog; ``prefixes`` is ``[N, L]``, returns ``[N]`` int64."""
    prefixes = np.asarray(prefixes)
    if len(prefixes) != len(item_ids):
        raise ValueError(f"{len(prefixes)} prefixes but {len(item_ids)} item ids")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item ids must be unique to get a dedup index each")
    order = sorted(range(len(item_ids)), key=lambda i: (tuple(int(c) for c in prefixes[i]), str(item_ids[i])))
    taken: dict[tuple[int, ...], set[int]] = {}
    out = np.empty(len(item_ids), np.int64)
    for i in order:
        key = tuple(int(c) for c in prefixes[i])
        group = taken.setdefault(key, set())
        try:
            out[i] = first_free(group, capacity)
        except DedupOverflowError as exc:
            raise DedupOverflowError(f"prefix {prefix_key(key)}: {exc}") from None
        group.add(int(out[i]))
    return out


def largest_prefix_group(prefixes: np.ndarray) -> tuple[tuple[int, ...], int]:
    """(the prefix most items share, how many share it)."""
    uniq, counts = np.unique(np.asarray(prefixes), axis=0, return_counts=True)
    top = int(counts.argmax())
    return tuple(int(c) for c in uniq[top]), int(counts[top])


def auto_dedup_size(prefixes: np.ndarray) -> int:
    """A dedup capacity sized from the catalog: twice its largest prefix group (room for new items that land in
    it), rounded up to a power of two, at least 8."""
    _, largest = largest_prefix_group(prefixes)
    return max(8, 1 << (2 * largest - 1).bit_length())


def check_dedup_capacity(prefixes: np.ndarray, capacity: int) -> None:
    """Fail before allocating, with the numbers, when a prefix group is larger than the dedup level."""
    prefix, largest = largest_prefix_group(prefixes)
    if largest > capacity:
        raise DedupOverflowError(
            f"{largest} items share the semantic-ID prefix {prefix_key(prefix)} but the dedup level holds "
            f"{capacity} (dedup_size): set dedup_size to at least {largest} (or 'auto', sized from the data), "
            "raise the codebook sizes, or give the items more features (titles, genres) so their codes differ"
        )


def collision_stats(prefixes: np.ndarray) -> dict[str, float]:
    """How often the quantized codes alone fail to tell items apart (before dedup)."""
    _, inverse, counts = np.unique(np.asarray(prefixes), axis=0, return_inverse=True, return_counts=True)
    n = len(prefixes)
    shared = counts[inverse.reshape(-1)] > 1
    return {
        "items": int(n),
        "unique_prefixes": int(len(counts)),
        "collision_rate": float(1.0 - len(counts) / n) if n else 0.0,  # items that need a dedup index > 0
        "items_sharing_prefix": float(shared.mean()) if n else 0.0,
        "max_items_per_prefix": int(counts.max()) if n else 0,
    }


class DedupStore(ABC):
    """The one atomic operation a dedup allocator needs; implementations must be safe across processes."""

    @abstractmethod
    def get_or_claim(self, prefix: str, item_id: str, capacity: int) -> int:
        """The item's index under ``prefix``; if it has none, atomically claim the lowest free one."""

    def seed(self, assignments: Iterable[tuple[str, str, int]]) -> None:
        """Record existing (prefix, item_id, index) triples (the artifact's table) before serving new items."""
        for prefix, item_id, index in assignments:
            self._put(prefix, item_id, index)

    @abstractmethod
    def _put(self, prefix: str, item_id: str, index: int) -> None: ...


class InMemoryDedupStore(DedupStore):
    """A dict per prefix behind a lock: one process (or one Flink instance that owns its prefixes)."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, int]] = {}
        self._taken: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def _put(self, prefix: str, item_id: str, index: int) -> None:
        with self._lock:
            items, taken = self._items.setdefault(prefix, {}), self._taken.setdefault(prefix, set())
            if item_id in items:
                if items[item_id] != index:
                    raise ValueError(f"seed conflict at prefix {prefix}: item {item_id} has {items[item_id]}, not {index}")
                return
            if index in taken:
                raise ValueError(f"seed conflict at prefix {prefix}: index {index} is already another item's")
            items[item_id] = index
            taken.add(index)

    def get_or_claim(self, prefix: str, item_id: str, capacity: int) -> int:
        with self._lock:
            items, taken = self._items.setdefault(prefix, {}), self._taken.setdefault(prefix, set())
            if item_id in items:
                return items[item_id]
            index = first_free(taken, capacity)
            items[item_id] = index
            taken.add(index)
            return index


# KEYS[1] = hash item_id -> index for one prefix. Indices are dense (never freed), so the next free one is
# HLEN; first_free() gives the same answer for a dense set. One key per call keeps it Redis Cluster safe.
_CLAIM_LUA = """
local have = redis.call('HGET', KEYS[1], ARGV[1])
if have then return tonumber(have) end
local n = redis.call('HLEN', KEYS[1])
if n >= tonumber(ARGV[2]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], n)
return n
"""


class RedisDedupStore(DedupStore):
    """Shared across any number of workers: one Lua script per claim (atomic in Redis)."""

    def __init__(self, client, namespace: str = "ugt:sid:dedup"):
        self._redis = client
        self._ns = namespace
        self._claim = client.register_script(_CLAIM_LUA)

    def _key(self, prefix: str) -> str:
        return f"{self._ns}:{{{prefix}}}"  # {prefix}: Redis Cluster hash tag

    def _put(self, prefix: str, item_id: str, index: int) -> None:
        self._redis.hsetnx(self._key(prefix), item_id, index)

    def seed(self, assignments: Iterable[tuple[str, str, int]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for n, (prefix, item_id, index) in enumerate(assignments, 1):
            pipe.hsetnx(self._key(prefix), item_id, index)
            if n % 5000 == 0:
                pipe.execute()
        pipe.execute()

    def get_or_claim(self, prefix: str, item_id: str, capacity: int) -> int:
        index = int(self._claim(keys=[self._key(prefix)], args=[item_id, capacity]))
        if index < 0:
            raise DedupOverflowError(
                f"prefix {prefix}: all {capacity} dedup indices are taken; raise dedup_size or the codebook sizes"
            )
        return index


class DedupAllocator:
    """Gives new items their dedup index through a store; the store decides who else it is shared with."""

    def __init__(self, store: DedupStore, capacity: int):
        if capacity < 1:
            raise ValueError("dedup capacity must be >= 1")
        self.store, self.capacity = store, int(capacity)

    def allocate(self, prefixes: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Batch in the given order (sort first if the batch itself must be order-independent)."""
        prefixes = np.asarray(prefixes)
        return np.asarray(
            [
                self.store.get_or_claim(prefix_key(p), str(item_id), self.capacity)
                for p, item_id in zip(prefixes, item_ids, strict=True)
            ],
            np.int64,
        )


def seed_rows(prefixes: np.ndarray, item_ids: Sequence[str], dedup: np.ndarray) -> Iterable[tuple[str, str, int]]:
    """(prefix key, item id, index) triples of an offline table, for :meth:`DedupStore.seed`."""
    for p, item_id, d in zip(np.asarray(prefixes), item_ids, np.asarray(dedup), strict=True):
        yield prefix_key(p), str(item_id), int(d)
