"""The KV cache of user prefixes: which user holds which slot (:class:`PrefixCache`), and the slots' K/V
(:class:`SlotPool`).

HSTU attention is causal, so the keys/values of every position before the last event depend only on the
user's past, never on the request time. A prefill keeps each user's per-layer K/V in a slot. A later request
of that user is one of:

* **hit**: same events (only the request time differs): only the last event runs, against the slot.
* **append**: the cached row's positions before its last event are unchanged (same events, times, long-term
  input) and new events follow: those positions' K/V are kept, the rest (the old last event, whose query time
  was the old request time, and the new events) run against them and are written into the slot.
* **miss**: anything else (a new user, the window slid, the long-term tokens changed): a whole prefill.

Slot ``capacity`` is scratch: padding rows, ``None`` keys and a key repeated within a batch write there,
and nothing reads it back.

Admission (``admission``): ``"lru"`` caches every miss, evicting the least recently used user when the pool is
full. ``"second_sight"`` caches a new user into a full pool only on its second miss within the last
``4 x capacity`` refused users (a doorkeeper, as TinyLFU's): under Zipf traffic a user seen once (and maybe never
again) then prefills into scratch instead of evicting a returning one. Refused misses are counted in ``refused``
(and in ``misses``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

HIT, APPEND, MISS = "hit", "append", "miss"
ADMISSIONS = ("lru", "second_sight")


@dataclass(slots=True)
class CachedPrefix:
    """One user's slot, the fingerprint of the cached row, its length, and the print of its committed
    positions (all before the last event; :meth:`BatchLayout.committed_print`), None when not known."""

    slot: int
    fingerprint: bytes
    length: int
    committed: bytes | None


class Lookup(NamedTuple):
    """Per row: the slot, :data:`HIT` / :data:`APPEND` / :data:`MISS`, and for an append the first recent
    position to compute (the cached length - 1; 0 otherwise)."""

    slots: list[int]
    kinds: list[str]
    starts: list[int]


class PrefixCache:
    """LRU of user key -> :class:`CachedPrefix`; slot ``capacity`` is scratch (never cached).

    ``slot_bytes``: what one slot holds in the pool, for :attr:`bytes_used` (the pool is sized by slots, each
    the whole window: see :meth:`SlotPool.slot_bytes`).
    """

    def __init__(self, capacity: int, slot_bytes: int = 0, admission: str = "lru"):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        if admission not in ADMISSIONS:
            raise ValueError(f"cache admission must be one of {list(ADMISSIONS)}, got {admission!r}")
        self.capacity = capacity
        self.slot_bytes = slot_bytes
        self.admission = admission
        self.entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self.refused_keys: OrderedDict[str, None] = OrderedDict()  # second_sight's doorkeeper
        self.free = list(range(capacity - 1, -1, -1))
        self.hits = 0
        self.appends = 0
        self.misses = 0
        self.refused = 0

    @property
    def scratch(self) -> int:
        return self.capacity

    @property
    def bytes_used(self) -> int:
        """K/V bytes held by cached users (slots in use x bytes per slot)."""
        return len(self.entries) * self.slot_bytes

    @property
    def bytes_reserved(self) -> int:
        """The pool's K/V bytes: every slot and the scratch one."""
        return (self.capacity + 1) * self.slot_bytes

    def stats(self) -> dict[str, int]:
        """The counters and bytes, as /metrics and the benches read them."""
        return {"hit": self.hits, "append": self.appends, "miss": self.misses, "refused": self.refused,
                "users": len(self.entries), "bytes_used": self.bytes_used, "bytes_reserved": self.bytes_reserved}

    def assign(self, keys: list[str | None], prints: list[bytes]) -> tuple[list[int], list[bool]]:
        """(slot, hit) per row, without appends (no committed prints): :meth:`lookup` for callers that only hit."""
        found = self.lookup(keys, prints)
        return found.slots, [kind == HIT for kind in found.kinds]

    def lookup(self, keys: list[str | None], prints: list[bytes], lengths: Sequence[int] | None = None,
               committed: Callable[[int, int], bytes] | None = None) -> Lookup:
        """Slot and kind per row; a repeated key in one batch and ``None`` keys get the scratch slot (a miss,
        uncounted). ``lengths`` and ``committed(row, m)`` (the print of a row's first m positions) allow appends."""
        found, seen = Lookup([], [], []), set()
        for b, (key, fp) in enumerate(zip(keys, prints, strict=True)):
            if key is None or key in seen or self.capacity == 0:
                self._add(found, self.scratch, MISS, 0)
                continue
            seen.add(key)
            entry = self.entries.get(key)
            start = -1
            if entry is not None:
                self.entries.move_to_end(key)
                if entry.fingerprint == fp:
                    self._add(found, entry.slot, HIT, 0)
                    self.hits += 1
                    continue
                slot = entry.slot  # the prefix moved: appended or prefilled again, in the user's own slot
                start = self._append_start(entry, b, lengths, committed)
            elif self._refuse(key):
                self._add(found, self.scratch, MISS, 0)
                self.misses += 1
                continue
            else:
                slot = self._free_slot()
            length = int(lengths[b]) if lengths is not None else 0
            mine = committed(b, length - 1) if committed is not None and length >= 1 else None
            self.entries[key] = CachedPrefix(slot, fp, length, mine)
            if start >= 0:
                self._add(found, slot, APPEND, start)
                self.appends += 1
            else:
                self._add(found, slot, MISS, 0)
                self.misses += 1
        return found

    @staticmethod
    def _add(found: Lookup, slot: int, kind: str, start: int) -> None:
        found.slots.append(slot)
        found.kinds.append(kind)
        found.starts.append(start)

    @staticmethod
    def _append_start(entry: CachedPrefix, b: int, lengths: Sequence[int] | None,
                      committed: Callable[[int, int], bytes] | None) -> int:
        """The first position to compute when row ``b`` extends the cached one exactly, else -1 (a miss)."""
        if lengths is None or committed is None or entry.committed is None or entry.length < 1:
            return -1
        if int(lengths[b]) <= entry.length or committed(b, entry.length - 1) != entry.committed:
            return -1
        return entry.length - 1

    def _refuse(self, key: str) -> bool:
        """second_sight: whether a new ``key`` stays out of a full pool (its first miss among the recent refusals)."""
        if self.admission == "lru" or self.free:
            return False
        if key in self.refused_keys:  # its second sight: admitted
            del self.refused_keys[key]
            return False
        self.refused_keys[key] = None
        if len(self.refused_keys) > 4 * self.capacity:
            self.refused_keys.popitem(last=False)
        self.refused += 1
        return True

    def _free_slot(self) -> int:
        """A free slot, evicting the least recently used user when none is left."""
        if not self.free:
            _, old = self.entries.popitem(last=False)
            self.free.append(old.slot)
        return self.free.pop()


class SlotPool:
    """Per-layer K/V, event times and validity of ``slots + 1`` cached prefixes (the last one scratch).

    Head-major (layer, slot, head, position, dim): a decode step reads each head's keys as one matrix.
    """

    def __init__(self, layers: int, slots: int, heads: int, positions: int, dqk: int, dv: int,
                 device: torch.device, dtype: torch.dtype):
        S = slots + 1
        self.k = torch.zeros(layers, S, heads, positions, dqk, device=device, dtype=dtype)
        self.v = torch.zeros(layers, S, heads, positions, dv, device=device, dtype=dtype)
        self.times = torch.zeros(S, positions, device=device, dtype=torch.int64)
        self.valid = torch.zeros(S, positions, device=device, dtype=torch.bool)

    @staticmethod
    def slot_bytes(layers: int, heads: int, positions: int, dqk: int, dv: int, dtype: torch.dtype) -> int:
        """Bytes one slot takes: every layer's K and V over the whole window, plus its times and validity."""
        element = torch.empty((), dtype=dtype).element_size()
        return layers * heads * positions * (dqk + dv) * element + positions * (8 + 1)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, times: torch.Tensor,
              valid: torch.Tensor) -> None:
        """Store prefilled rows: keys/values (L, B, H, T, d), times/valid (B, T), row b into ``slots[b]``."""
        self.k.index_copy_(1, slots, keys)
        self.v.index_copy_(1, slots, values)
        self.times.index_copy_(0, slots, times)
        self.valid.index_copy_(0, slots, valid)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of one layer's cached keys/values (B, H, T, d) of ``slots`` (a decode writes into them)."""
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)
