"""Item freshness: a learned logit term from an item's age at the moment of each prediction.

Why: on MovieLens what predicts a new item is mostly that it is new (new releases are what people watch last), and
an item that arrives after training has nothing else the model trained on: its ID row is empty, the decade bucket of
its year may be unseen, and its semantic-ID codes often open a first-level cluster of their own. Its *age* at the
request (request year - release year, bucketed) is in-distribution: the 1999 movies watched in 2000 teach the model
what "at most a year old" is worth, and a 2000 movie watched in 2000 lands in the same bucket.

The term, added to the cosine score of user state ``h`` and item ``i`` at a position whose target time is ``t``:
``bias[s_i, b(t, i)] + h . w[s_i, b(t, i)]`` with ``b`` the age bucket and ``s_i`` whether the item is scored without
an ID row (items added after training, and in training a per-step share of the young items, ``idless_share``): the
ID-less case gets its own learned values, trained on young items whose ID row is dropped for the step, so the model
learns that case rather than only having it dropped out. Serving computes the same term from the request time and
the live item's release year (the item feed's ``year`` field, serving/live_items.py).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

FIRST_YEAR, LAST_YEAR = 1970, 2200  # the years a request time is placed in (epoch seconds before 1970: 1970)


@dataclass
class FreshnessConfig:
    enabled: bool = False
    # bucket starts in years of age: <2, 2, 3-5, 6-10, 11-20, 21+ (and one bucket for an unknown release year).
    # The first bucket holds ages 0 and 1 so that an item newer than any trained one (age 0) shares it with the
    # youngest trained items (age 1)
    edges: list[int] = field(default_factory=lambda: [2, 3, 6, 11, 21])
    per_user: bool = True  # + h . w[bucket]: how much this user follows new releases
    # training only: each step, this share of the young items (released in the latest `young_years` years of the
    # trained catalog) is embedded and scored without its ID row, with the ID-less bucket values
    idless_share: float = 0.0
    young_years: int = 1
    # > 0: also a term from the item's event count over the `recent_days` days before the position's day (log2
    # buckets), from the event log the model is built with: what a live counter in the stream would give a new item
    recent_days: int = 0


COUNT_BUCKETS = 12  # log2(1 + count) buckets of the recent-count term: 0, 1, 2-3, ..., >= 2^11 - 1
DAY = 86400


def recent_count_buckets(items: np.ndarray, times: np.ndarray, num_items: int, days: int
                         ) -> tuple[int, np.ndarray]:
    """(first day, (D + 1, V + 1) uint8): per calendar day since the first event's, the log2 bucket of each item's
    event count over the ``days`` days before it (that day's own events not counted)."""
    first = int(times.min()) // DAY
    day = times // DAY - first
    counts = np.zeros((int(day.max()) + 2, num_items + 1), np.int64)
    np.add.at(counts, (day + 1, items), 1)  # row d + 1: the events of day d
    total = np.cumsum(counts, axis=0)  # row d: the events before day d
    window = total - np.concatenate([np.zeros((days, num_items + 1), np.int64), total[:-days]])[: len(total)]
    return first, np.clip(np.floor(np.log2(1 + window)), 0, COUNT_BUCKETS - 1).astype(np.uint8)


def year_starts() -> torch.Tensor:
    """Epoch seconds of 1 January of FIRST_YEAR .. LAST_YEAR (UTC), for an exact year of a request time."""
    return torch.as_tensor([calendar.timegm((y, 1, 1, 0, 0, 0)) for y in range(FIRST_YEAR, LAST_YEAR + 1)],
                           dtype=torch.long)


class FreshnessTerm(nn.Module):
    """``forward(user (M, D), query_times (M,), idless (V + 1,) bool)`` -> the term (M, V + 1), in cosine units."""

    def __init__(self, d_model: int, num_items: int, config: FreshnessConfig, item_release: np.ndarray | None = None,
                 event_log: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        if sorted(config.edges) != list(config.edges) or not config.edges or config.edges[0] < 1:
            raise ValueError(f"freshness.edges must be increasing ages >= 1, got {config.edges}")
        if not 0.0 <= config.idless_share <= 1.0:
            raise ValueError(f"freshness.idless_share must be in [0, 1], got {config.idless_share}")
        self.config = config
        self.num_buckets = len(config.edges) + 2  # the age buckets + unknown release year
        release = np.zeros(num_items + 1, np.int64) if item_release is None else np.asarray(item_release, np.int64)
        self.register_buffer("item_release", torch.as_tensor(release), persistent=True)
        # which items have a trained ID row: False for the cold-start holdout and rows reserved for new items
        self.register_buffer("trained", torch.ones(num_items + 1, dtype=torch.bool), persistent=True)
        self.register_buffer("edges", torch.as_tensor(config.edges, dtype=torch.long), persistent=False)
        self.register_buffer("year_starts", year_starts(), persistent=False)
        self.bias = nn.Parameter(torch.zeros(2, self.num_buckets))  # [with ID row, without]
        self.proj = nn.Parameter(torch.zeros(2, self.num_buckets, d_model)) if config.per_user else None
        self.recent_bias = self.recent_proj = None
        if config.recent_days > 0:
            if event_log is None or not len(event_log[0]):
                raise ValueError("freshness.recent_days needs the event log the model is built with")
            first, table = recent_count_buckets(*event_log, num_items, config.recent_days)
            self.register_buffer("first_day", torch.tensor(first), persistent=True)
            self.register_buffer("recent_table", torch.as_tensor(table), persistent=True)
            self.recent_bias = nn.Parameter(torch.zeros(2, COUNT_BUCKETS))
            self.recent_proj = nn.Parameter(torch.zeros(2, COUNT_BUCKETS, d_model)) if config.per_user else None

    def query_years(self, query_times: torch.Tensor) -> torch.Tensor:
        """Calendar year (UTC) of each epoch-seconds time."""
        index = torch.bucketize(query_times.long(), self.year_starts, right=True) - 1
        return index.clamp(min=0) + FIRST_YEAR

    def buckets(self, year: int) -> torch.Tensor:
        """(V + 1,) the age bucket of every item at ``year``; the last bucket for an unknown release year."""
        age = year - self.item_release
        b = torch.searchsorted(self.edges, age.clamp(min=0), right=True)
        return torch.where(self.item_release > 0, b, torch.full_like(b, self.num_buckets - 1))

    def young(self) -> torch.Tensor:
        """(V + 1,) the trained items released in the catalog's latest ``young_years`` years."""
        known = self.trained & (self.item_release > 0)
        if not bool(known.any()):
            return torch.zeros_like(self.trained)
        latest = int(self.item_release[known].max())
        return known & (self.item_release > latest - self.config.young_years)

    def forward(self, user: torch.Tensor, query_times: torch.Tensor, idless: torch.Tensor) -> torch.Tensor:
        M, K = user.shape[0], self.num_buckets
        values = self.bias.view(1, 2 * K).expand(M, 2 * K)
        if self.proj is not None:
            values = values + user.float() @ self.proj.view(2 * K, -1).T
        sets = idless.long() * K  # column offset: the ID-less values for items without an ID row
        years = self.query_years(query_times)
        out = values.new_zeros(M, self.item_release.shape[0])
        for year in torch.unique(years).tolist():
            rows = years == year
            out[rows] = values[rows].index_select(1, sets + self.buckets(int(year)))
        if self.recent_bias is not None:
            out = out + self.recent_term(user, query_times, idless)
        return out

    def recent_term(self, user: torch.Tensor, query_times: torch.Tensor, idless: torch.Tensor) -> torch.Tensor:
        """(M, V + 1): the values of each item's recent-count bucket on the position's day."""
        M = user.shape[0]
        values = self.recent_bias.view(1, -1).expand(M, -1)
        if self.recent_proj is not None:
            values = values + user.float() @ self.recent_proj.view(2 * COUNT_BUCKETS, -1).T
        day = (query_times.long() // DAY - self.first_day).clamp(0, self.recent_table.shape[0] - 1)
        width = self.item_release.shape[0]
        buckets = self.recent_table[day][:, :width].long()  # rows reserved while serving: no count (bucket 0)
        if buckets.shape[1] < width:
            buckets = torch.nn.functional.pad(buckets, (0, width - buckets.shape[1]))
        return values.gather(1, buckets + idless.long() * COUNT_BUCKETS)

    def idless(self, step_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Items scored with the ID-less values: no trained ID row, or dropped for this training step."""
        return ~self.trained if step_drop is None else ~self.trained | step_drop

    @torch.no_grad()
    def reserve(self, extra: int) -> None:
        """Rows for items added while serving: no trained ID row, release year set by :meth:`set_release`."""
        self.item_release = torch.cat([self.item_release, self.item_release.new_zeros(extra)])
        self.trained = torch.cat([self.trained, self.trained.new_zeros(extra)])

    @torch.no_grad()
    def set_release(self, ids: torch.Tensor, years: np.ndarray) -> None:
        """Release years (0 = unknown) of reserved rows ``ids``: what the item feed's ``year`` field carries."""
        self.item_release[ids] = torch.as_tensor(np.asarray(years, np.int64), device=ids.device)
