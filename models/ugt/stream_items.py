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
        # (rows, C, D) like sums: the softmax's pull on each item over every event before the day
        # (:func:`background_sums`), and the share of it taken out of each item's sum
        self.background: torch.Tensor | None = None
        self.background_share = 0.0

    def vectors_by_day(self, table: torch.Tensor) -> torch.Tensor:
        """(rows, C, D) the items' blended stream vectors as of each day row (what :meth:`rescore` scores by)."""
        content = table[torch.as_tensor(self.items, device=table.device)].float()
        return blend(content.unsqueeze(0).expand_as(self.sums), self.centered(self.sums, self.counts, None),
                     self.counts, self.k, self.scale)

    def centered(self, sums: torch.Tensor, counts: torch.Tensor, row: torch.Tensor | None) -> torch.Tensor:
        """``sums`` minus the shares of the mean state (``gamma``) and of the background (``background_share``)."""
        if self.center is not None and self.gamma:
            sums = sums - self.gamma * counts.unsqueeze(-1).float() * self.center
        if self.background is not None and self.background_share:
            sums = sums - self.background_share * (self.background if row is None else self.background[row])
        return sums

    def rows(self, request_times: torch.Tensor) -> torch.Tensor:
        """The day row each request time reads: the days before its own."""
        return (request_times.long() // DAY - self.first_day).clamp(0, self.sums.shape[0] - 1)

    def at(self, request_times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums (B, C, D), counts (B, C)) as of each request time's day."""
        row = self.rows(request_times)
        return self.sums[row], self.counts[row]

    def rescore(self, scores: torch.Tensor, state: torch.Tensor, table: torch.Tensor,
                request_times: torch.Tensor) -> torch.Tensor:
        """``scores`` (B, V + 1) with the items' cosine part (``state`` (B, D) . their ``table`` row) replaced by
        the cosine with their blended stream vectors as of each row's request day; other terms kept."""
        ids = torch.as_tensor(self.items, device=scores.device)
        content = table[ids].float()
        row = self.rows(request_times)
        sums, counts = self.sums[row], self.counts[row]
        vectors = blend(content.unsqueeze(0).expand_as(sums), self.centered(sums, counts, row), counts, self.k,
                        self.scale)
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


@torch.no_grad()
def event_states(model: torch.nn.Module, data: SequenceData, first_day: int, max_len: int, max_long: int,
                 device: torch.device | str = "cpu", batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (n, D), day rows (n,)) of every event in the log: the model's state before it and the row of
    :class:`DailySums` its day's events count in (``day - first_day + 1``)."""
    split = make_split(_all_events(data), "train", max_len, max_long, all_windows=True, min_window=1)
    states, rows = [], []
    for np_batch in iterate_batches(split, batch_size, shuffle=False):
        batch = {k: torch.as_tensor(v, device=device) for k, v in np_batch.items()}
        user, _ = model(batch)
        hit = batch["targets"] > 0
        states.append(user.float()[hit])
        rows.append(batch["query_times"][hit].long() // DAY - first_day + 1)
    return torch.cat(states), torch.cat(rows)


@torch.no_grad()
def background_sums(sums: DailySums, table: torch.Tensor, states: torch.Tensor, rows: torch.Tensor,
                    temperature: float, chunk: int = 2048) -> torch.Tensor:
    """(rows, C, D) cumulative over days: sum over every event e before the day of p_i(u_e) u_e, the full-softmax
    probability of new item i for e's state times that state, with the items scored by their stream vectors as of
    e's day (``sums``' current k, gamma, scale) at ``temperature``.

    Why: a softmax step on the events moves item i's row by (sum of its events' states) - (this sum). The stream
    vector is the first part alone; an item whose vector every recent user's state points at gets a large second
    part, which pulls it back for the users who do not pick it: what a retrain's negatives do.
    """
    by_day = sums.vectors_by_day(table)  # (rows, C, D)
    ids = torch.as_tensor(sums.items, device=table.device)
    out = torch.zeros_like(sums.sums)
    last = sums.sums.shape[0] - 1
    for lo in range(0, len(states), chunk):
        u, row = states[lo:lo + chunk], rows[lo:lo + chunk].clamp(1, last)
        logits = u @ table.T
        logits[:, 0] = float("-inf")  # the padding row
        logits[:, ids] = torch.einsum("ncd,nd->nc", by_day[row - 1], u)
        p = torch.softmax(logits / temperature, dim=-1)[:, ids]  # (n, C)
        out.index_add_(0, row, p.unsqueeze(-1) * u.unsqueeze(1))
    return out.cumsum(0)


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
