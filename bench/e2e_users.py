"""The users of bench/serving_gpu_e2e.py: ML-1M's users replayed from the dataset, their states and new events.

Each ML-1M user (events in time order, tokenized as the tokenize job does for a RATE event: the action token and
:func:`contracts.tokenizer.rating_token`) starts with a state of their first ``min(n, MAX_EVENTS - room)`` events,
so ``room`` new events fit before the window slides (a full window shifts with every event, which no prefix
cache can reuse). New events are the user's next real events, then (when those run out) items drawn from the
catalog a minute apart. ``clones`` copies of each user, each with its own id and its own new events, make the
population larger than the KV cache's hot set. A state is the row the user_state job writes
(contracts.user_state_rule ``UserState.to_feature_row``), written in Feast's layout (bench/state_bytes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.state_bytes import StateWriter
from contracts.tokenizer import ACTION_TOKEN, rating_token
from contracts.user_state_rule import DEFAULT_MAX_EVENTS, STATE_VERSION
from infra.feast_store import FeastRedisLayout

RATE = ACTION_TOKEN["RATE"]


@dataclass
class Users:
    """User ids, each with a base user's events (items, times in ms, rating tokens) and how many of them are in
    the state now (``shown``); ``seen``: users 0..seen-1 have been requested since the server started."""

    ids: list[str]
    base: np.ndarray  # per user: the index of the ML-1M user whose events they replay
    items: list[list[str]]  # per base user: every event's item, then catalog draws
    times: list[list[int]]
    ratings: list[list[int]]
    shown: np.ndarray  # per user: events in their state now
    first: np.ndarray  # per user: events in their first state
    seen: int = 0
    draws: int = 1  # catalog draws after each base user's real events
    base_users: int = 0
    events: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    window: int = DEFAULT_MAX_EVENTS  # events a state keeps (the user_state job's max_events)

    def row(self, u: int) -> dict[str, Any]:
        """User ``u``'s state row now: the last ``window`` of their shown events (past the catalog draws, the
        draws again, a minute apart: a hot user can be asked for more new events than were drawn)."""
        b, n = int(self.base[u]), int(self.shown[u])
        lo = max(0, n - self.window)
        size = len(self.items[b])
        if n <= size:
            items, times, ratings = self.items[b][lo:n], self.times[b][lo:n], self.ratings[b][lo:n]
        else:
            real = size - self.draws
            at = [i if i < size else real + (i - real) % self.draws for i in range(lo, n)]
            items = [self.items[b][i] for i in at]
            ratings = [self.ratings[b][i] for i in at]
            last = self.times[b][real - 1]
            times = [self.times[b][i] if i < size else last + 60_000 * (i - real + 1) for i in range(lo, n)]
        return {"user_id": self.ids[u], "recent_item_ids": items,
                "recent_action_tokens": [RATE] * (n - lo), "recent_rating_tokens": ratings,
                "recent_event_times": times, "event_count": n, "last_event_time": times[-1],
                "state_version": STATE_VERSION}

    def append_row(self, u: int) -> dict[str, Any]:
        """User ``u``'s state after one more event (their next one)."""
        self.shown[u] += 1
        return self.row(u)

    def write_initial(self, client: Any, chunk: int = 2000, processes: int = 1) -> None:
        """Every user's first state, pipelined in chunks (a progress bar: 250k users take a while); with
        ``processes`` > 1, forked processes write the chunks, each with its own connection to ``client``'s Redis."""
        self.shown[:] = self.first
        spans = [(lo, min(lo + chunk, len(self.ids))) for lo in range(0, len(self.ids), chunk)]
        bar = tqdm(total=len(self.ids), desc="states", unit="user", unit_scale=True, mininterval=5)
        if processes > 1:
            import multiprocessing

            _WRITING["users"], _WRITING["redis"] = self, client.connection_pool.connection_kwargs
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                for done in pool.imap_unordered(_write_span, spans):
                    bar.update(done)
        else:
            writer = StateWriter(client, FeastRedisLayout("ugt"))
            for lo, hi in spans:
                writer.write([self.row(u) for u in range(lo, hi)])
                bar.update(hi - lo)
        bar.close()
        client.zadd("ugt:popularity:movie", self.extra.pop("popularity", {}) or {"_": 0.0})

    def reset(self) -> None:
        """A new server: nobody has been requested yet (their states keep the events written so far)."""
        self.seen = 0

    def describe(self) -> dict[str, Any]:
        return {"users": len(self.ids), "base_users": self.base_users, "dataset_events": self.events,
                "mean_first_state": round(float(np.mean(self.first)), 1), **self.extra}


_WRITING: dict[str, Any] = {}  # what forked writers of Users.write_initial read


def _write_span(span: tuple[int, int]) -> int:
    """Write users span[0]..span[1]-1's first states (in a forked process); how many."""
    import redis

    users, kwargs = _WRITING["users"], _WRITING["redis"]
    client = redis.Redis(host=kwargs.get("host", "127.0.0.1"), port=kwargs.get("port", 6379), db=kwargs.get("db", 0))
    StateWriter(client, FeastRedisLayout("ugt")).write([users.row(u) for u in range(*span)])
    client.close()
    return span[1] - span[0]


def ml1m_users(checkpoint: Path, clones: int, room: int, seed: int, draws: int = 1024) -> Users:
    """ML-1M's users (items outside the checkpoint's vocabulary dropped), ``clones`` ids each, shuffled."""
    import torch

    from contracts.datasets import load_dataset

    vocab = list(torch.load(checkpoint, map_location="cpu", weights_only=False)["vocab"])
    known = set(vocab)
    data = load_dataset("ml-1m").ratings.sort_values(["user_id", "timestamp", "row"], kind="stable")
    data = data[data["item_id"].astype(str).isin(known)]
    rng = np.random.default_rng(seed)
    items, times, ratings, first = [], [], [], []
    keep = max(1, DEFAULT_MAX_EVENTS - room)
    for _, group in data.groupby("user_id", sort=True):
        its = group["item_id"].astype(str).tolist()
        ts = (group["timestamp"].astype(np.int64) * 1000).tolist()
        rs = [rating_token(r) for r in group["rating"].tolist()]
        more = rng.choice(len(vocab), size=draws)  # after the user's real events: catalog draws, a minute apart
        items.append(its + [vocab[i] for i in more])
        times.append(ts + [ts[-1] + 60_000 * (j + 1) for j in range(draws)])
        ratings.append(rs + [8] * draws)
        first.append(min(len(its), keep))
    n_base = len(items)
    order = rng.permutation(n_base * clones)  # clones spread over the population, not adjacent
    base = order % n_base
    ids = [f"ml1m-{int(b)}~{int(c)}" for b, c in zip(base, order // n_base, strict=True)]
    counts = data["item_id"].astype(str).value_counts()
    popularity = {str(item): float(n) for item, n in counts.head(500).items()}
    first_arr = np.asarray(first, dtype=np.int64)[base]
    return Users(ids=ids, base=base, items=items, times=times, ratings=ratings, shown=first_arr.copy(),
                 first=first_arr, draws=draws, base_users=n_base, events=len(data),
                 extra={"popularity": popularity, "append_room": room, "clones": clones})


@dataclass
class SyntheticUsers(Users):
    """Users whose events are drawn on demand from a per-user seed (no per-event Python objects are kept): event
    ``i`` of user ``u`` is the same on every call, so a state can be rebuilt, appended to and read back at will.
    Items Zipf-like over the catalog (``cdf`` over popularity ranks, ``rank_item`` a rank's catalog index), event
    times increasing (1 to 600 s apart), ratings 1..5."""

    names: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))  # catalog index -> item id
    cdf: np.ndarray = field(default_factory=lambda: np.empty(0))
    rank_item: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    seed: int = 0

    def row(self, u: int) -> dict[str, Any]:
        n = int(self.shown[u])
        lo = max(0, n - self.window)
        draws = np.random.default_rng([self.seed, u]).random((n, 3))  # row i: event i, whatever n is
        ranks = np.minimum(np.searchsorted(self.cdf, draws[lo:, 0]), len(self.cdf) - 1)
        times = SYNTHETIC_EPOCH_MS + 1000 * np.cumsum(1 + (draws[:, 1] * 600).astype(np.int64))
        ratings = RATING_TOKENS[1 + (draws[lo:, 2] * 5).astype(np.int64)].tolist()
        window_times = times[lo:].tolist()
        return {"user_id": self.ids[u], "recent_item_ids": self.names[self.rank_item[ranks]].tolist(),
                "recent_action_tokens": [RATE] * (n - lo), "recent_rating_tokens": ratings,
                "recent_event_times": window_times, "event_count": n, "last_event_time": window_times[-1],
                "state_version": STATE_VERSION}

    def describe(self) -> dict[str, Any]:
        return {"users": len(self.ids), "synthetic": True, "items": len(self.names), "window": self.window,
                "mean_first_state": round(float(np.mean(self.first)), 1), **self.extra}


SYNTHETIC_EPOCH_MS = 1_700_000_000_000  # 2023-11-14: the synthetic users' first events
RATING_TOKENS = np.asarray([rating_token(r) for r in range(6)], dtype=np.int64)  # stars 1..5 -> tokens


def synthetic_users(users: int, names: np.ndarray, window: int, first_events: int, room: int, seed: int,
                    zipf: float = 1.0) -> SyntheticUsers:
    """``users`` synthetic users over the catalog ``names`` (item ids by catalog index), states of
    ``window`` events at most, each starting with ``first_events`` (``room`` more fit before the window slides);
    items drawn with probability proportional to rank^-``zipf`` (ranks a seeded shuffle of the catalog)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, len(names) + 1, dtype=np.float64) ** -zipf
    cdf = np.cumsum(weights) / weights.sum()
    rank_item = rng.permutation(len(names))
    first = np.full(users, min(first_events, window), dtype=np.int64)
    popularity = {str(names[rank_item[r]]): float(weights[r] * 1e6) for r in range(min(500, len(names)))}
    return SyntheticUsers(ids=[f"syn-{u}" for u in range(users)], base=np.zeros(0, np.int64), items=[], times=[],
                          ratings=[], shown=first.copy(), first=first, draws=0, base_users=0, events=0,
                          extra={"popularity": popularity, "append_room": room, "zipf": zipf,
                                 "first_events": int(first[0]) if users else 0},
                          window=window, names=names, cdf=cdf, rank_item=rank_item, seed=seed)
