"""Stream vectors of live items in serving: each event a served user had on an item added after training moves that
item's output row toward the user's state before it (models/ugt/stream_items.py), with no retrain.

Where the events come from: the histories of the users serving answers. When a request's history holds an event
on a live item that this server has not counted for that user yet, the model's state before that event (the
history up to it, at its time: what evaluation reads for the same event) is added to the item's running sum, and
the item's table row becomes the blend of its content row and that sum, as bench/cold_start.py's stream rows score
it. Counted once per (user, item) per engine; a restarted engine counts again from the histories it sees.

Two steps, so either scope runs them where they belong (docs/SERVING.md): :meth:`LiveStreamVectors.pending` finds a
history's uncounted live-item events and packs each one's prefix row (pure numpy: an ``engine_scope: model`` worker
does this and sends the rows in its model frame); :meth:`LiveStreamVectors.observe_packed` runs the engine's model
on those rows, adds the states and rewrites the items' served rows (in the process that owns the model and the
item table). ``engine_scope: pipeline`` runs both in its one engine, through :meth:`LiveStreamVectors.observe`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.data import history_row
from models.eval import last_states
from models.ugt.model import UGT
from models.ugt.runner.batch import BatchLayout
from models.ugt.stream_items import StreamSums

MAX_PAIRS = 1_000_000  # (user, item) pairs remembered as counted; beyond it the oldest half is forgotten


def new_events(items: Sequence[int], live_from: int, counted: set[tuple[str, int]], user: str) -> list[int]:
    """Positions of ``items`` (vocabulary indices) that are events on live items (index >= ``live_from``) not yet
    counted for ``user``; the first event of a history has no state before it and is skipped."""
    out, seen = [], set()
    for p, item in enumerate(items):
        if p and item >= live_from and (user, item) not in counted and item not in seen:
            out.append(p)
            seen.add(item)
    return out


def remember(counted: set[tuple[str, int]], pairs: Sequence[tuple[str, int]]) -> None:
    """Add (user, item) pairs to a bounded set (the oldest half goes past MAX_PAIRS)."""
    if len(counted) > MAX_PAIRS:
        kept = list(counted)[MAX_PAIRS // 2 :]
        counted.clear()
        counted.update(kept)
    counted.update(pairs)


@dataclass(slots=True)
class StreamEvents:
    """Live-item events to count: per event its user, its item index and its prefix row in the packed layout."""

    users: list[str] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)  # (W,) each: BatchLayout.row_vectors of the prefix

    def extend(self, other: StreamEvents) -> None:
        self.users += other.users
        self.items += other.items
        self.vectors += other.vectors

    def matrix(self, width: int) -> np.ndarray:
        return np.stack(self.vectors) if self.vectors else np.zeros((0, width), np.int64)


class LiveStreamVectors:
    """Running state sums of live items and the table rows they give (``model.embed.config.stream_k`` > 0).

    ``model`` is the served one (``UGTInference.model``: its item tables hold the reserved live rows) and ``layout``
    the engine's packed row layout; ``table`` the engine's item table, whose live rows :meth:`observe_packed`
    rewrites.
    """

    def __init__(self, model: UGT, layout: BatchLayout, table: torch.Tensor, max_len: int, max_long: int):
        c = model.embed.config
        center = model.embed.stream_mean.detach().float().cpu().numpy()
        self.model, self.layout, self.table, self.max_len, self.max_long = model, layout, table, max_len, max_long
        self.live_from = model.embed.num_items + 1  # reserved rows: items added while serving
        self.sums = StreamSums(model.embed.capacity, model.config.d_model, c.stream_k, center, c.stream_center,
                               c.stream_scale)
        self.sums.track(np.arange(self.live_from, model.embed.capacity + 1))
        self.counted: set[tuple[str, int]] = set()

    def pending(self, user: str, items: np.ndarray, times: np.ndarray, ratings: np.ndarray,
                counted: set[tuple[str, int]] | None = None) -> StreamEvents:
        """The user's live-item events not in ``counted`` (default: this engine's), each with the packed row of
        the history before it at its time (``items`` vocabulary indices, ``times`` seconds)."""
        out = StreamEvents()
        for p in new_events(items.tolist(), self.live_from, self.counted if counted is None else counted, user):
            row = history_row(items[:p], times[:p], ratings[:p], self.max_len, self.max_long, int(times[p]))
            out.users.append(user)
            out.items.append(int(items[p]))
            out.vectors.append(self.layout.row_vectors([row])[0])
        return out

    @torch.inference_mode()
    def observe_packed(self, events: StreamEvents) -> np.ndarray:
        """Count the events not counted yet: the model's state at the end of each prefix row is added to its item's
        sum, and the changed items' rows of the served table rewritten; returns those items."""
        keep, seen = [], set()
        for j, pair in enumerate(zip(events.users, events.items, strict=True)):
            if pair not in self.counted and pair not in seen:  # once per pair, within one frame too
                keep.append(j)
                seen.add(pair)
        if not keep:
            return np.zeros(0, np.int64)
        device = self.model.embed.item_emb.weight.device
        vectors = np.stack([events.vectors[j] for j in keep]).astype(np.int64)
        batch = self.layout.unpack(torch.as_tensor(vectors, device=device))
        user_state, _ = self.model(batch)
        states = last_states(user_state.float(), batch["lengths"]).cpu().numpy()
        items = np.asarray([events.items[j] for j in keep], np.int64)
        remember(self.counted, [(events.users[j], events.items[j]) for j in keep])
        changed = self.sums.add(items, states)
        if len(changed):
            index = torch.as_tensor(changed, device=self.table.device)
            self.table[index] = self.rows(changed).to(self.table.device, self.table.dtype)
        return changed

    def observe(self, user: str, items: np.ndarray, times: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        """Both steps for one history (``engine_scope: pipeline``): the items whose rows changed."""
        return self.observe_packed(self.pending(user, items, times, ratings))

    @torch.inference_mode()
    def rows(self, items: np.ndarray) -> torch.Tensor:
        """(n, D) the served output rows of live ``items``: their content rows blended with their stream sums."""
        ids = torch.as_tensor(np.asarray(items, np.int64), device=self.model.embed.item_emb.weight.device)
        return self.sums.vectors(items, self.model.embed.output_vectors(ids).float())
