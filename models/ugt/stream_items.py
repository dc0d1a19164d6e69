"""Stream vectors: an item with no trained ID row, embedded from the user states of the events it gets after training.

Why: on MovieLens what a retrain gives a new item is its ID row, learned from who watched it; its content (genres,
decade, semantic-ID codes) carries little of that (docs/RESULTS.md, cold start). The events a new item gets in the
stream carry it: a softmax step on an event (user state ``h``, item ``i``) moves ``i``'s output vector toward ``h``,
so the normalised sum of the states that preceded its events is what such steps from nothing would give, with no
optimizer and no retrain. The item's served vector blends that with its content vector, trusting the stream more as
its events add up:

    v_i = normalize((1 - w) c_i + w m_i),   w = n_i / (n_i + k),   m_i = normalize(sum of the states before i's events)

with ``c_i`` the content output vector (what the model scores an ID-less item by), ``n_i`` the item's event count,
``k`` (``freshness.stream_k``) the count at which both weigh the same. The freshness terms
(models/ugt/freshness.py) are added on top as for any ID-less item.

Two users of the same arithmetic: :class:`StreamSums` keeps running sums (serving: each event of a live item adds
the user's state before it), :func:`daily_sums` keeps them per calendar day so an evaluation row on day ``d`` only
sees the events of days before it (the same causality as the recent-count term).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from models.data import Batchable, SequenceData, iterate_batches, make_split, without_items

DAY = 86400


def blend(content: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, k: float,
          scale: float = 1.0) -> torch.Tensor:
    """(..., D) vectors of length ``scale``: ``content`` (..., D) unit rows blended with the normalised state
    ``sums`` (..., D) by ``w = counts / (counts + k)``; an item with no event keeps its content vector."""
    if k <= 0:
        raise ValueError(f"stream_k must be > 0, got {k}")
    if scale <= 0:
        raise ValueError(f"stream_scale must be > 0, got {scale}")
    w = (counts.float() / (counts.float() + k)).unsqueeze(-1)
    mean = F.normalize(sums.float(), dim=-1, eps=1e-6)
    return scale * F.normalize((1 - w) * content.float() + w * mean, dim=-1, eps=1e-6)


class StreamSums:
    """Running state sums and event counts of items without a trained ID row (serving's live items).

    ``add`` takes the states that preceded events of those items; ``vectors`` gives their blended output rows.
    Rows are item indices of the model's table; only rows marked with :meth:`track` are kept (trained items have
    their ID row and gain nothing).
    """

    def __init__(self, capacity: int, d_model: int, k: float, center: np.ndarray | None = None, gamma: float = 0.0,
                 scale: float = 1.0):
        if k <= 0:
            raise ValueError(f"stream_k must be > 0, got {k}")
        self.k, self.gamma, self.scale = float(k), float(gamma), float(scale)
        self.center = np.zeros(d_model, np.float32) if center is None else np.asarray(center, np.float32)
        self.sums = np.zeros((capacity + 1, d_model), np.float32)
        self.counts = np.zeros(capacity + 1, np.int64)
        self.tracked = np.zeros(capacity + 1, bool)

    def track(self, items: np.ndarray) -> None:
        """Keep sums for these rows from now on (items that arrived after training)."""
        self.tracked[np.asarray(items, np.int64)] = True

    def add(self, items: np.ndarray, states: np.ndarray) -> np.ndarray:
        """Add each event's preceding user state (n, D) to its item (n,); returns the tracked rows that changed."""
        items = np.asarray(items, np.int64)
        keep = (items > 0) & (items < len(self.tracked))
        keep[keep] = self.tracked[items[keep]]
        items, states = items[keep], np.asarray(states, np.float32)[keep]
        np.add.at(self.sums, items, states)
        np.add.at(self.counts, items, 1)
        return np.unique(items)

    def vectors(self, items: np.ndarray, content: torch.Tensor) -> torch.Tensor:
        """(n, D) the served rows of ``items`` given their content rows (n, D)."""
        items = np.asarray(items, np.int64)
        centered = self.sums[items] - self.gamma * self.counts[items, None] * self.center  # as DailySums.rescore
        sums = torch.as_tensor(centered, device=content.device)
        counts = torch.as_tensor(self.counts[items], device=content.device)
        return blend(content, sums, counts, self.k, self.scale).to(content.dtype)


class DailySums:
    """Per-day cumulative state sums of ``items``: row ``r`` of ``sums`` / ``counts`` holds the events of the days
    before ``first_day + r`` (evaluation: a request on day d sees only the stream before that day)."""

    def __init__(self, items: np.ndarray, first_day: int, sums: torch.Tensor, counts: torch.Tensor, k: float = 1.0,
                 center: torch.Tensor | None = None, gamma: float = 0.0, scale: float = 1.0):
        self.items, self.first_day, self.sums, self.counts, self.k = items, first_day, sums, counts, k
        self.center, self.gamma = center, gamma  # (D,) mean_state, and the share of it taken out of each mean
        self.scale = scale  # the rows' length (EmbeddingConfig.stream_scale)

    def at(self, request_times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums (B, C, D), counts (B, C)) as of each request time's day."""
        row = (request_times.long() // DAY - self.first_day).clamp(0, self.sums.shape[0] - 1)
        return self.sums[row], self.counts[row]

    def rescore(self, scores: torch.Tensor, state: torch.Tensor, table: torch.Tensor,
                request_times: torch.Tensor) -> torch.Tensor:
        """``scores`` (B, V + 1) with the items' cosine part (``state`` (B, D) . their ``table`` row) replaced by
        the cosine with their blended stream vectors as of each row's request day; other terms kept."""
        ids = torch.as_tensor(self.items, device=scores.device)
        content = table[ids].float()
        sums, counts = self.at(request_times)
        if self.center is not None and self.gamma:
            sums = sums - self.gamma * counts.unsqueeze(-1).float() * self.center
        vectors = blend(content.unsqueeze(0).expand_as(sums), sums, counts, self.k, self.scale)
        stream = torch.einsum("bcd,bd->bc", vectors, state.float())
        out = scores.clone()
        out[:, ids] += stream - state.float() @ content.T
        return out


def _all_events(data: SequenceData) -> SequenceData:
    """The data with two padding events after every sequence, so a train split's targets are every real event."""
    return replace(data, items=[np.append(s, [0, 0]) for s in data.items],
                   times=[np.append(t, [t[-1], t[-1]]) for t in data.times],
                   ratings=[np.append(r, [0, 0]) for r in data.ratings])


@torch.no_grad()
def state_sums(model: torch.nn.Module, split: Batchable, items: np.ndarray, days: tuple[int, int] | None,
               device: torch.device | str = "cpu", batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) of the model's state before every target of ``split`` that is one of ``items`` (bool
    (V + 1,)): per item column (``items``' order), and with ``days`` = (first day, number of rows) per day too,
    row ``d - first + 1`` for an event on day ``d`` (not cumulated)."""
    was_training = model.training
    model.eval()
    index = np.flatnonzero(items)
    column = torch.full((len(items),), -1, dtype=torch.long)
    column[torch.as_tensor(index)] = torch.arange(len(index))
    rows = 1 if days is None else days[1]
    sums = torch.zeros(rows, len(index), model.config.d_model)
    counts = torch.zeros(rows, len(index), dtype=torch.long)
    for np_batch in iterate_batches(split, batch_size, shuffle=False):
        batch = {k: torch.as_tensor(v, device=device) for k, v in np_batch.items()}
        user, _ = model(batch)
        targets = batch["targets"].cpu()
        hit = (targets > 0) & (column[targets] >= 0)
        if not bool(hit.any()):
            continue
        cols = column[targets[hit]]
        row = (torch.as_tensor(np_batch["query_times"])[hit] // DAY - days[0] + 1 if days is not None
               else torch.zeros_like(cols))
        sums.index_put_((row, cols), user.float().cpu()[hit], accumulate=True)
        counts.index_put_((row, cols), torch.ones_like(cols), accumulate=True)
    if was_training:
        model.train()
    return sums, counts


def training_events(data: SequenceData, cold: np.ndarray | None, max_len: int, max_long: int) -> Batchable:
    """Every training event as a target once (the held-out items' events removed): what :func:`mean_state` reads."""
    kept = without_items(data, cold) if cold is not None else data
    return make_split(kept, "train", max_len, max_long, all_windows=True, min_window=1)


@torch.no_grad()
def mean_state(model: torch.nn.Module, train_split: Batchable, device: torch.device | str = "cpu",
               batch_size: int = 512) -> torch.Tensor:
    """(D,) the mean model state before the training split's events: the direction every user's state shares,
    taken out of the new items' state means (``center``) so they do not outscore trained rows for everyone."""
    items = np.ones(model.config.num_items + 1, bool)
    items[0] = False
    sums, counts = state_sums(model, train_split, items, None, device, batch_size)
    return (sums[0].sum(0) / counts.sum().clamp(min=1)).to(device)


@torch.no_grad()
def daily_sums(model: torch.nn.Module, data: SequenceData, items: np.ndarray, max_len: int, max_long: int,
               device: torch.device | str = "cpu", batch_size: int = 512) -> DailySums:
    """The model's state before every event of ``items`` (bool (V + 1,)) in the whole event log, summed per item
    and calendar day, cumulated over days (:class:`DailySums`)."""
    split = make_split(_all_events(data), "train", max_len, max_long, all_windows=True, min_window=1)
    first = int(min(t.min() for t in data.times if len(t))) // DAY
    last = int(max(t.max() for t in data.times if len(t))) // DAY
    sums, counts = state_sums(model, split, items, (first, last - first + 2), device, batch_size)
    return DailySums(np.flatnonzero(items), first, sums.cumsum(0).to(device), counts.cumsum(0).to(device))
