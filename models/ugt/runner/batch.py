"""The input batch: request rows packed into one int64 tensor, so a batch crosses to the device in one copy.

Layout of a full row (``BatchLayout.width`` columns, then the cache slot, then the exclusions):
``ROW_FIELDS`` (N columns each), the length, the long-term ids and times (E columns each). A decode (every
row a KV-cache hit) reads only each row's last event, so its compact layout is ``ROW_FIELDS`` at the last
position, the length and the slot (``COMPACT_WIDTH`` columns), then the exclusions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

ROW_FIELDS = ("ids", "times", "query_times", "ratings", "gaps", "query_gaps")  # (B, N) each
COMPACT_WIDTH = len(ROW_FIELDS) + 2  # the last event's ROW_FIELDS, the length, the cache slot


_LAST_FIELDS = ("ids", "times", "ratings", "gaps")  # the last position's fields a prefix holds (not its query)


def prefix_hash(row: dict[str, np.ndarray], upto: int) -> hashlib._Hash:
    """SHA-256 of a one-row input's long-term ids and times, then of its positions ``< upto`` position by position
    (each position's ``ROW_FIELDS``): what :func:`fingerprint_from` finishes, and what an append extends with
    :func:`extend_hash` (positions before a row's last one never change when events are appended)."""
    h = hashlib.sha256()
    for key in ("long_ids", "long_times"):
        h.update(np.ascontiguousarray(row[key]))
    return extend_hash(h, row, 0, upto)


def extend_hash(h: hashlib._Hash, row: dict[str, np.ndarray], lo: int, hi: int) -> hashlib._Hash:
    """``h`` updated with positions ``lo..hi-1`` of ``row`` (each position's ``ROW_FIELDS``, in order); ``h``."""
    if hi > lo:
        h.update(np.stack([row[key][0, lo:hi] for key in ROW_FIELDS], axis=-1).astype(np.int64, copy=False))
    return h


def fingerprint_from(h: hashlib._Hash, row: dict[str, np.ndarray]) -> bytes:
    """The fingerprint of ``row`` from :func:`prefix_hash` of its positions before the last (``h`` is not changed):
    the last position without its query time and gap, and the length, added to a copy."""
    n = int(row["lengths"][0])
    last = h.copy()
    if n:
        last.update(np.asarray([int(row[key][0, n - 1]) for key in _LAST_FIELDS], dtype=np.int64))
    last.update(n.to_bytes(8, "little"))
    return last.digest()[:16]


def prefix_fingerprint(row: dict[str, np.ndarray]) -> bytes:
    """Hash of everything in a one-row input except the last position's request time (and its gap bucket): the
    cache key. SHA-256 (its first 16 bytes) of the long-term input, the filled positions position by position (past
    the length a row is zeros) and the length: a cached row's hash of its positions before the last one is extended
    by an append's new positions alone (serving/ugt_generator.py), where blake2b over the whole padded arrays was
    ~0.06 ms of a worker's CPU per appended row at history 1,024."""
    n = int(row["lengths"][0])
    return fingerprint_from(prefix_hash(row, max(n - 1, 0)), row)


def exclusion_matrix(excludes: list[np.ndarray]) -> np.ndarray:
    """(n, X) int64 of each row's unique excluded item indices, 0-padded; X a power of two."""
    width = max([len(e) for e in excludes] + [1])
    out = np.zeros((len(excludes), 1 << (width - 1).bit_length()), dtype=np.int64)
    for b, e in enumerate(excludes):
        out[b, : len(e)] = e
    return out


class BatchLayout:
    """Packs rows of a model with window ``N`` and ``E`` long-term events; pads with the ``scratch_slot``."""

    def __init__(self, recent_len: int, long_len: int, device: torch.device, scratch_slot: int = 0):
        self.N, self.E = recent_len, long_len
        self.width = len(ROW_FIELDS) * recent_len + 1 + 2 * long_len
        self.device = device
        self.scratch_slot = scratch_slot
        self._pinned: dict[tuple[int, int], torch.Tensor] = {}  # reused pinned staging buffers by shape

    def row_vectors(self, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
        """(n, W) int64: each one-row model input flattened into the packed layout (callers may keep these)."""
        n, N, E = len(rows), self.N, self.E
        out = np.empty((n, self.width), dtype=np.int64)
        for f, key in enumerate(ROW_FIELDS):
            out[:, f * N : (f + 1) * N] = np.concatenate([r[key] for r in rows])
        out[:, 6 * N] = np.concatenate([r["lengths"] for r in rows])
        out[:, 6 * N + 1 : 6 * N + 1 + E] = np.concatenate([r["long_ids"][:, :E] for r in rows])
        out[:, 6 * N + 1 + E :] = np.concatenate([r["long_times"][:, :E] for r in rows])
        return out

    def committed_print(self, vector: np.ndarray, m: int) -> bytes:
        """A packed row's first ``m`` recent positions (every ROW_FIELD) and its long-term input, as bytes.

        The K/V of those positions depend on nothing else (attention is causal, embedding, norms and FFN are per
        token), so two rows with the same print have the same K/V there: what an append may keep. The bytes
        themselves, not a hash of them: comparing ~10 KB is a memcmp, hashing them was 25 us per row of the
        engine's one thread (bench/engine_profile.py), and a cached user keeps them beside a K/V slot of ~40x that.
        """
        recent = vector[: len(ROW_FIELDS) * self.N].reshape(len(ROW_FIELDS), self.N)[:, :m]
        return b"".join((int(m).to_bytes(8, "little"), recent.tobytes(),
                         vector[len(ROW_FIELDS) * self.N + 1 : self.width].tobytes()))

    def _host(self, shape: tuple[int, int], fresh: bool) -> torch.Tensor:
        """A host block: pinned on CUDA, fresh from the caching allocator or one reused buffer per shape."""
        if self.device.type != "cuda":
            return torch.empty(shape, dtype=torch.int64)
        if fresh:
            return torch.empty(shape, dtype=torch.int64, pin_memory=True)
        host = self._pinned.get(shape)
        if host is None:
            host = self._pinned[shape] = torch.empty(shape, dtype=torch.int64, pin_memory=True)
        return host

    def pack(self, vectors: np.ndarray, excl: np.ndarray, slots: list[int], pad_to: int,
             fresh: bool = False) -> torch.Tensor:
        """One int64 (pad_to, W + 1 + X) host tensor (pinned on CUDA): rows, cache slot, exclusions.

        ``fresh``: a new block from the caching host allocator, safe while earlier batches' copies are still
        queued; otherwise one reused buffer per shape (only for callers that wait for each batch).
        """
        n = len(vectors)
        if pad_to < n:
            raise ValueError(f"cannot pad a batch of {n} rows to {pad_to}")
        host = self._host((pad_to, self.width + 1 + excl.shape[1]), fresh)
        buf = host.numpy()
        buf[:n, : self.width] = vectors
        buf[:n, self.width] = slots
        buf[:n, self.width + 1 :] = excl
        if pad_to > n:
            buf[n:] = 0
            buf[n:, self.width] = self.scratch_slot
        return host

    def pack_compact(self, vectors: np.ndarray, excl: np.ndarray, slots: list[int], pad_to: int) -> torch.Tensor:
        """The decode-only host tensor (pad_to, COMPACT_WIDTH + X), fresh pinned block on CUDA: only the last
        event of each row crosses to the GPU (the rest of the prefix is in the cache)."""
        n, N = len(vectors), self.N
        if pad_to < n:
            raise ValueError(f"cannot pad a batch of {n} rows to {pad_to}")
        host = self._host((pad_to, COMPACT_WIDTH + excl.shape[1]), fresh=True)
        buf = host.numpy()
        lengths = vectors[:, 6 * N]
        last = np.maximum(lengths - 1, 0)
        cols = np.arange(len(ROW_FIELDS)) * N + last[:, None]  # (n, 6): each field's last position
        buf[:n, : len(ROW_FIELDS)] = np.take_along_axis(vectors, cols, axis=1)
        buf[:n, len(ROW_FIELDS)] = lengths
        buf[:n, len(ROW_FIELDS) + 1] = slots
        buf[:n, COMPACT_WIDTH:] = excl
        if pad_to > n:
            buf[n:] = 0
            buf[n:, len(ROW_FIELDS) + 1] = self.scratch_slot
        return host

    def unpack(self, dev: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's batch dict, as views of a packed (device) buffer."""
        N, E = self.N, self.E
        batch = {key: dev[:, f * N : (f + 1) * N] for f, key in enumerate(ROW_FIELDS)}
        batch["lengths"] = dev[:, 6 * N]
        batch["long_ids"] = dev[:, 6 * N + 1 : 6 * N + 1 + E]
        batch["long_times"] = dev[:, 6 * N + 1 + E : 6 * N + 1 + 2 * E]
        return batch

    def last_events(self, buf: torch.Tensor, compact: bool):
        """(each row's last event as ROW_FIELDS of (B, 1), lengths, cache slots) of a :meth:`pack` buffer, or of a
        :meth:`pack_compact` one, which holds only those."""
        if compact:
            take = {key: buf[:, f : f + 1] for f, key in enumerate(ROW_FIELDS)}
            return take, buf[:, len(ROW_FIELDS)], buf[:, len(ROW_FIELDS) + 1]
        batch = self.unpack(buf[:, : self.width])
        last = (batch["lengths"] - 1).clamp(min=0).view(-1, 1)
        return {key: batch[key].gather(1, last) for key in ROW_FIELDS}, batch["lengths"], buf[:, self.width]

    def exclusions(self, dev: torch.Tensor, compact: bool = False) -> torch.Tensor:
        """The exclusion columns of a :meth:`pack` (or :meth:`pack_compact`) buffer."""
        return dev[:, COMPACT_WIDTH:] if compact else dev[:, self.width + 1 :]

    def stack_columns(self, dev: torch.Tensor, compact: bool) -> torch.Tensor:
        """The columns the stack reads (never the exclusions): one graph per step and batch size."""
        return dev[:, :COMPACT_WIDTH] if compact else dev[:, : self.width + 1]
