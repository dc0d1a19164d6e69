"""Stream vectors of live items in serving: each event a served user had on an item added after training moves that
item's output row toward the user's state before it (models/ugt/stream_items.py), with no retrain.

Where the events come from: the histories of the users serving answers. When a request's history holds an event
on a live item that this server has not counted for that user yet, the model's state before that event (the
history up to it, at its time: what evaluation reads for the same event) is added to the item's running sum, and
the item's table row becomes the blend of its content row and that sum, as bench/cold_start.py's stream rows score
it. Counted once per (user, item) per server; a restarted server counts again from the histories it sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.data import history_row
from models.eval import batch_to_device, last_states
from models.ugt.model import UGT
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


class LiveStreamVectors:
    """Running state sums of live items and the table rows they give (``model.embed.config.stream_k`` > 0)."""

    def __init__(self, model: UGT, max_len: int, max_long: int):
        c = model.embed.config
        center = model.embed.stream_mean.detach().float().cpu().numpy()
        self.model, self.max_len, self.max_long = model, max_len, max_long
        self.live_from = model.embed.num_items + 1  # reserved rows: items added while serving
        self.sums = StreamSums(model.embed.capacity, model.config.d_model, c.stream_k, center, c.stream_center,
                               c.stream_scale)
        self.sums.track(np.arange(self.live_from, model.embed.capacity + 1))
        self.counted: set[tuple[str, int]] = set()

    @torch.inference_mode()
    def observe(self, user: str, items: np.ndarray, times: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        """Count the user's not yet counted live-item events (``items`` vocabulary indices, ``times`` seconds);
        returns the item rows whose vectors changed."""
        positions = new_events(items.tolist(), self.live_from, self.counted, user)
        if not positions:
            return np.zeros(0, np.int64)
        states = []
        device = self.model.embed.item_emb.weight.device
        for p in positions:
            row = history_row(items[:p], times[:p], ratings[:p], self.max_len, self.max_long, int(times[p]))
            batch = batch_to_device(row, device)
            user_state, _ = self.model(batch)
            states.append(last_states(user_state.float(), batch["lengths"])[0].cpu().numpy())
        events = items[positions]
        if len(self.counted) > MAX_PAIRS:
            self.counted = set(list(self.counted)[MAX_PAIRS // 2 :])
        self.counted.update((user, int(i)) for i in events)
        return self.sums.add(events, np.stack(states))

    @torch.inference_mode()
    def rows(self, items: np.ndarray) -> torch.Tensor:
        """(n, D) the served output rows of live ``items``: their content rows blended with their stream sums."""
        ids = torch.as_tensor(np.asarray(items, np.int64), device=self.model.embed.item_emb.weight.device)
        return self.sums.vectors(items, self.model.embed.output_vectors(ids).float())
