"""The KV cache of user prefixes: which user holds which slot (:class:`PrefixCache`), and the slots' K/V
(:class:`SlotPool`).

HSTU attention is causal, so the keys/values of every position before the last event depend only on the
user's past, never on the request time. A prefill keeps each user's per-layer K/V in a slot; a later request
whose prefix is unchanged (same events, only the request time differs) runs only its last token against it.
Slot ``capacity`` is scratch: padding rows, ``None`` keys and a key repeated within a batch write there,
and nothing reads it back.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    """LRU of user key -> (slot, prefix fingerprint); slot ``capacity`` is scratch (never cached)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self.free = list(range(capacity - 1, -1, -1))
        self.hits = 0
        self.misses = 0

    @property
    def scratch(self) -> int:
        return self.capacity

    def assign(self, keys: list[str | None], prints: list[bytes]) -> tuple[list[int], list[bool]]:
        """(slot, hit) per row; a repeated key in one batch and ``None`` keys get the scratch slot, uncached."""
        slots, hits, seen = [], [], set()
        for key, fp in zip(keys, prints, strict=True):
            if key is None or key in seen or self.capacity == 0:
                slots.append(self.scratch)
                hits.append(False)
                continue
            seen.add(key)
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                if entry[1] == fp:
                    slots.append(entry[0])
                    hits.append(True)
                    self.hits += 1
                    continue
                slot = entry[0]  # the prefix moved: prefill again into the user's own slot
            else:
                slot = self._free_slot()
            self.entries[key] = (slot, fp)
            slots.append(slot)
            hits.append(False)
            self.misses += 1
        return slots, hits

    def _free_slot(self) -> int:
        """A free slot, evicting the least recently used user when none is left."""
        if not self.free:
            _, (slot_old, _) = self.entries.popitem(last=False)
            self.free.append(slot_old)
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
