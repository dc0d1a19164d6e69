"""Sequences and leave-one-out splits under the HSTU protocol, as padded numpy arrays.

Why this shape: HSTU's ML-1M numbers (and the SASRec baseline beside them) come from one preprocessing
(meta-recsys/generative-recommenders, ``research/data/preprocessor.py``): ``ratings.sort_values(by=
["unix_timestamp"])`` -- pandas' default *quicksort*, which is not stable, so events with equal
timestamps are reordered -- then ``groupby("user_id")``. We reproduce that call exactly on the ratings in
their original file order (``tie_order="hstu"``) and offer ``tie_order="stable"`` (ties keep file order)
beside it. numpy's quicksort on int64 may dispatch to SIMD sorts, so the HSTU tie order can differ between
CPUs; the stable variant is the one that is reproducible everywhere.

Splits (leave-one-out by time, per user): the last event is the test target, the one before it the
validation target (early stopping), and everything before that is training data. The test history is the
whole sequence before the last event (so it includes the validation item), as SASRec's and HSTU's
evaluation do. Each model input is the most recent ``max_len`` events; like HSTU, sequences are
left-aligned (real events first, padding after), so causal attention never sees padding.

Tokens come from :mod:`contracts.tokenizer` (rating tokens, time-gap buckets), so the trainer and the
streaming jobs agree on what a token is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd

from contracts.tokenizer import NUM_TIME_GAP_BUCKETS, TokenVocab, rating_token, time_gap_bucket

TIE_ORDERS = ("hstu", "stable")
SPLITS = ("train", "valid", "test")


@dataclass
class SequenceData:
    """Per-user chronological sequences (item indices, 0 = padding) plus item metadata."""

    name: str
    tie_order: str
    vocab: TokenVocab
    user_ids: list[str]
    items: list[np.ndarray]  # per user, int64 item indices (1..num_items)
    times: list[np.ndarray]  # per user, int64 epoch seconds
    ratings: list[np.ndarray]  # per user, int64 rating tokens (contracts.tokenizer.rating_token)
    genre_names: list[str]
    item_genres: np.ndarray  # [num_items + 1, max_genres] genre index + 1 (0 = none)
    item_year_bucket: np.ndarray  # [num_items + 1] 0 = unknown, else decade bucket
    item_titles: list[str] = field(default_factory=list)  # index -> title ("" for padding)
    item_release_year: np.ndarray | None = None  # [num_items + 1] release year, 0 = unknown (the cold-start split)

    @property
    def num_items(self) -> int:
        return len(self.vocab)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def item_popularity(self, split: str = "train") -> np.ndarray:
        """Counts per item index over the events a model may learn from in ``split``."""
        cut = {"train": 2, "valid": 2, "test": 1}[split]
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for seq in self.items:
            np.add.at(counts, seq[: max(0, len(seq) - cut)], 1)
        counts[0] = 0
        return counts


def order_ratings(ratings: pd.DataFrame, tie_order: str) -> pd.DataFrame:
    """Sort ratings by time the way HSTU's preprocessor does, or stably.

    The input is first put in original file order (the ``row`` column), which is what HSTU's
    ``pd.read_csv`` of ratings.dat hands to ``sort_values``.
    """
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {tie_order!r}")
    base = ratings.sort_values("row", kind="stable").reset_index(drop=True)
    if tie_order == "hstu":
        # Exactly HSTU's call: default kind (quicksort, unstable) on the timestamp column.
        return base.sort_values(by=["timestamp"])
    return base.sort_values(by=["timestamp"], kind="stable")


def _vectorized(fn, values: np.ndarray) -> np.ndarray:
    """Apply a pure scalar tokenizer function through its unique values (fast, and exactly the same)."""
    uniques, inverse = np.unique(values, return_inverse=True)
    mapped = np.array([fn(v) for v in uniques.tolist()], dtype=np.int64)
    return mapped[inverse].reshape(values.shape)


def year_bucket(year: int) -> int:
    """The release-decade token of a year (1 = 1900s ... 15; 0 is kept for unknown)."""
    return int(np.clip((year - 1900) // 10 + 1, 1, 15))


def build_sequences(dataset, tie_order: str = "hstu", vocab: TokenVocab | None = None) -> SequenceData:
    """Turn a ``contracts.datasets.Dataset`` into per-user sequences.

    The vocabulary holds every catalog item (HSTU ranks over all movies of movies.dat, rated or not),
    then any rated item missing from the catalog. A given ``vocab`` (a checkpoint's) is kept as it is: events
    of items outside it are dropped, as a model trained on that vocabulary cannot score them.
    """
    ratings = dataset.ratings
    missing = {"user_id", "item_id", "timestamp", "row"} - set(ratings.columns)
    if missing:
        raise ValueError(f"ratings lack columns {sorted(missing)}")
    if len(ratings) == 0:
        raise ValueError("dataset has no ratings")
    catalog = dataset.items
    if vocab is None:
        vocab = TokenVocab()
        for item_id in catalog["item_id"].astype(str):
            vocab.add(item_id)
        for item_id in pd.unique(ratings["item_id"].astype(str)):
            vocab.add(item_id)
    else:
        ratings = ratings[ratings["item_id"].astype(str).isin(vocab.item_to_index)]
        catalog = catalog[catalog["item_id"].astype(str).isin(vocab.item_to_index)]
        if len(ratings) == 0:
            raise ValueError("no event of the dataset is of an item in the given vocabulary")

    ordered = order_ratings(ratings, tie_order)
    item_index = ordered["item_id"].astype(str).map(vocab.item_to_index).to_numpy(np.int64)
    rating_values = ordered["rating"].to_numpy(np.float64) if "rating" in ordered else np.full(len(ordered), np.nan)
    rating_tokens = _vectorized(lambda r: 0 if r != r else rating_token(r), rating_values)
    times = ordered["timestamp"].to_numpy(np.int64)
    users = ordered["user_id"].astype(str).to_numpy()
    # groupby keeps the sorted order within each user (as HSTU's groupby(...).apply(list) does).
    codes, uniques = pd.factorize(users, sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    seq_items, seq_times, seq_ratings = [], [], []
    for u in range(len(uniques)):
        idx = order[bounds[u] : bounds[u + 1]]
        seq_items.append(item_index[idx])
        seq_times.append(times[idx])
        seq_ratings.append(rating_tokens[idx])

    genre_names = sorted({g for gs in catalog["genres"] for g in gs}) if "genres" in catalog else []
    genre_of = {g: i + 1 for i, g in enumerate(genre_names)}
    max_genres = max([len(gs) for gs in catalog.get("genres", [])] + [1])
    item_genres = np.zeros((len(vocab) + 1, max_genres), dtype=np.int64)
    item_year = np.zeros(len(vocab) + 1, dtype=np.int64)
    release = np.zeros(len(vocab) + 1, dtype=np.int64)
    titles = [""] * (len(vocab) + 1)
    for row in catalog.itertuples(index=False):
        index = vocab.index_of(str(row.item_id))
        for j, g in enumerate(getattr(row, "genres", []) or []):
            item_genres[index, j] = genre_of[g]
        year = getattr(row, "year", None)
        if year is not None and not pd.isna(year):
            item_year[index] = year_bucket(int(year))
            release[index] = int(year)
        titles[index] = str(getattr(row, "title", ""))
    return SequenceData(
        name=getattr(dataset, "name", "dataset"),
        tie_order=tie_order,
        vocab=vocab,
        user_ids=[str(u) for u in uniques],
        items=seq_items,
        times=seq_times,
        ratings=seq_ratings,
        genre_names=genre_names,
        item_genres=item_genres,
        item_year_bucket=item_year,
        item_titles=titles,
        item_release_year=release,
    )


def limit_users(data: SequenceData, max_users: int) -> SequenceData:
    """The first ``max_users`` users (in user-id order) when > 0: a config's ``max_users``, whatever the source."""
    if max_users > 0 and data.num_users > max_users:
        data = replace(data, user_ids=data.user_ids[:max_users], items=data.items[:max_users],
                       times=data.times[:max_users], ratings=data.ratings[:max_users])
    return data


def cold_item_mask(data: SequenceData, spec: dict) -> np.ndarray | None:
    """(V + 1,) bool: the items treated as arriving after training (the cold-start protocol), or None.

    ``{"year_from": 2000}``: every item released in or after that year (new releases are what users watch last:
    on ML-1M, 156 items and 13 % of the test targets); ``{"fraction": 0.1, "seed": 0}``: a random share.
    """
    if not spec:
        return None
    mask = np.zeros(data.num_items + 1, dtype=bool)
    if "year_from" in spec:
        if data.item_release_year is None:
            raise ValueError("cold_items.year_from needs release years (a dataset with a catalog, not a lake)")
        mask = data.item_release_year >= int(spec["year_from"])
    elif "fraction" in spec:
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        n = int(round(float(spec["fraction"]) * data.num_items))
        mask[rng.choice(np.arange(1, data.num_items + 1), size=n, replace=False)] = True
    else:
        raise ValueError(f"cold_items needs year_from or fraction, got {spec}")
    mask[0] = False
    if not mask.any():
        raise ValueError(f"cold_items {spec} selects no item")
    return mask


def without_items(data: SequenceData, drop: np.ndarray) -> SequenceData:
    """The same data with every event of the ``drop`` items removed (what a model trained before they existed saw).

    Used for the training split only: a user's last two kept events then come from earlier in their history, so
    nothing of the full data's validation / test targets leaks into training.
    """
    keep = [~drop[s] for s in data.items]
    return replace(data, items=[s[k] for s, k in zip(data.items, keep, strict=True)],
                   times=[t[k] for t, k in zip(data.times, keep, strict=True)],
                   ratings=[r[k] for r, k in zip(data.ratings, keep, strict=True)])


def _gap_thresholds() -> np.ndarray:
    """The smallest whole number of seconds that reaches each time-gap bucket 2..63 of :func:`time_gap_bucket`."""
    thresholds = []
    for bucket in range(2, NUM_TIME_GAP_BUCKETS):
        lo, hi = 1, 1 << 62  # time_gap_bucket is non-decreasing: bisect for the first gap in `bucket`
        while lo < hi:
            mid = (lo + hi) // 2
            if time_gap_bucket(mid) >= bucket:
                hi = mid
            else:
                lo = mid + 1
        thresholds.append(lo)
    return np.asarray(thresholds, dtype=np.int64)


_GAP_THRESHOLDS = _gap_thresholds()


def time_gap_bucket_array(gaps: np.ndarray) -> np.ndarray:
    """:func:`time_gap_bucket` of every whole-second gap, vectorised (one searchsorted; the same buckets).

    Serving builds a row per request with this, so it must cost microseconds, not a Python call per value.
    """
    gaps = np.asarray(gaps, dtype=np.int64)
    buckets = 1 + np.searchsorted(_GAP_THRESHOLDS, gaps, side="right")
    return np.where(gaps > 0, buckets, 0).astype(np.int64)


def time_gap_buckets(times: np.ndarray) -> np.ndarray:
    """Tokenizer time-gap bucket of each event vs. the one before it (0 for the first)."""
    return time_gap_bucket_array(np.diff(times, prepend=times[:1]))


@dataclass
class Batchable:
    """One split as padded arrays: row b is one example (left-aligned, 0 = padding).

    For training rows every position t predicts ``targets[b, t]`` (0 = no target). For eval rows only
    the last real position predicts ``target[b]``. ``query_times[b, t]`` is the time of the event that
    position t predicts (HSTU's relative time bias uses it: the request time is known when serving).
    """

    ids: np.ndarray  # [R, N]
    times: np.ndarray  # [R, N]
    query_times: np.ndarray  # [R, N]
    ratings: np.ndarray  # [R, N]
    gaps: np.ndarray  # [R, N] time-gap bucket vs. previous event
    query_gaps: np.ndarray  # [R, N] time-gap bucket from each event to the event it predicts
    lengths: np.ndarray  # [R]
    targets: np.ndarray  # [R, N] (train) or [R] (eval)
    target_ratings: np.ndarray  # rating tokens of the targets, same shape as targets
    users: np.ndarray  # [R] user row index
    long_ids: np.ndarray  # [R, E] events older than the window (for long-term compression), 0 = pad
    long_times: np.ndarray  # [R, E]

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, keep: np.ndarray) -> Batchable:
        """The rows where ``keep`` (bool, one per row) holds."""
        return Batchable(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def rows(self, index: np.ndarray, trim: bool = True) -> dict[str, np.ndarray]:
        """The rows ``index`` as a batch; ``trim`` cuts the padding columns no row of it reaches
        (:func:`batch_width`), so a dataset of short sequences does not pay for the model's whole window."""
        lengths = self.lengths[index]
        width = batch_width(lengths, self.ids.shape[1]) if trim else self.ids.shape[1]
        per_position = self.targets.ndim == 2  # train rows: a target at every position
        return {
            "ids": self.ids[index, :width],
            "times": self.times[index, :width],
            "query_times": self.query_times[index, :width],
            "ratings": self.ratings[index, :width],
            "gaps": self.gaps[index, :width],
            "query_gaps": self.query_gaps[index, :width],
            "lengths": lengths,
            "targets": self.targets[index, :width] if per_position else self.targets[index],
            "target_ratings": self.target_ratings[index, :width] if per_position else self.target_ratings[index],
            "users": self.users[index],
            "long_ids": self.long_ids[index],
            "long_times": self.long_times[index],
            "row_index": np.asarray(index, dtype=np.int64),
        }


PAD_MULTIPLE = 8  # batch widths are rounded up to this (fewer distinct shapes for torch.compile / CUDA kernels)


def batch_width(lengths: np.ndarray, max_len: int) -> int:
    """The columns a batch needs: its longest row, rounded up to :data:`PAD_MULTIPLE`, at most ``max_len``.

    Rows are left-aligned (real events first), positions count from the left and attention is causal with the
    padding masked, so cutting trailing padding columns leaves every real position's output unchanged
    (tests/models/test_batch_padding.py checks loss and scores).
    """
    longest = int(lengths.max()) if len(lengths) else 1
    return int(min(max_len, max(1, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)))


def _row_ends(data: SequenceData, split: str, max_len: int, all_windows: bool, min_window: int) -> list[tuple[int, int]]:
    """(user, end) per row of ``split``: events[:end] is the row's history (train: inputs + targets); users with
    fewer than 3 events have none. ``all_windows`` adds each user's earlier non-overlapping windows."""
    keep = [u for u, s in enumerate(data.items) if len(s) >= 3]
    rows_spec = [(u, len(data.items[u]) - (2 if split in ("train", "valid") else 1)) for u in keep]
    if all_windows:
        extra = []
        for u, end in rows_spec:
            end -= max_len
            while end - 1 >= min_window:
                extra.append((u, end))
                end -= max_len
        rows_spec += extra
    return rows_spec


def window_start(count: int, max_len: int, hop: int = 0) -> int:
    """The index of the first event in the model's window over a user's first ``count`` events: the last
    ``max_len`` (hop 0), or, with ``hop`` > 0, a start that moves in steps of ``hop`` events (a multiple of it), so
    the window holds ``max_len - hop + 1`` to ``max_len`` events and stays put for ``hop - 1`` new events. Serving
    (the ``history_hop`` key) and the evaluator (``ugt eval --history-hop``) share it: a window that moves with
    every event changes every position of the row, which no KV prefix cache can reuse."""
    if count <= max_len:
        return 0
    if hop <= 0:
        return count - max_len
    return -(-(count - max_len) // hop) * hop


def make_split(data: SequenceData, split: str, max_len: int, max_long: int = 0, all_windows: bool = False,
               min_window: int = 10, hop: int = 0) -> Batchable:
    """Padded arrays for ``split`` with at most ``max_len`` model positions per row.

    train: each user's events except the last two; input = events[:-1] (last max_len), targets = next
    events. valid/test: history = events before the target (last max_len), target = events[-2] / [-1].
    ``max_long`` > 0 also keeps up to that many older events (before the window) for long-term
    compression (UGT's multi-scale input); the baselines ignore them, as HSTU drops them.
    ``all_windows`` (train only): users longer than one window also get rows for earlier, non-overlapping
    windows (at least ``min_window`` events), so every training event is a target once per epoch
    instead of only the last ``max_len`` per user (HSTU's protocol trains on the last window only).
    ``hop`` (valid/test): the window starts at :func:`window_start` (as serving's ``history_hop`` starts it); the
    events before it are long-term input as usual.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    rows_spec = _row_ends(data, split, max_len, all_windows and split == "train", min_window)
    R, N, E = len(rows_spec), max_len, max(max_long, 1)
    out = {k: np.zeros((R, N), dtype=np.int64) for k in ("ids", "times", "query_times", "ratings", "gaps")}
    lengths = np.zeros(R, dtype=np.int64)
    targets = np.zeros((R, N) if split == "train" else R, dtype=np.int64)
    target_ratings = np.zeros_like(targets)
    long_ids = np.zeros((R, E), dtype=np.int64)
    long_times = np.zeros((R, E), dtype=np.int64)
    gaps_of: dict[int, np.ndarray] = {}
    for r, (u, end) in enumerate(rows_spec):
        items, times, ratings = data.items[u], data.times[u], data.ratings[u]
        if u not in gaps_of:
            gaps_of[u] = time_gap_buckets(times)
        gaps = gaps_of[u]
        if split == "train":
            start = max(0, end - 1 - N)
            hist = slice(start, end - 1)
            n = end - 1 - start
            targets[r, :n] = items[start + 1 : end]
            target_ratings[r, :n] = ratings[start + 1 : end]
            qt = times[start + 1 : end]
        else:
            start = window_start(end, N, hop)
            hist = slice(start, end)
            n = end - start
            targets[r] = items[end]
            target_ratings[r] = ratings[end]
            qt = np.append(times[start + 1 : end], times[end])
        out["ids"][r, :n] = items[hist]
        out["times"][r, :n] = times[hist]
        out["ratings"][r, :n] = ratings[hist]
        out["gaps"][r, :n] = gaps[hist]
        out["query_times"][r, :n] = qt
        lengths[r] = n
        if max_long > 0 and start > 0:
            ls = max(0, start - max_long)
            m = start - ls
            long_ids[r, :m] = items[ls:start]
            long_times[r, :m] = times[ls:start]
    query_gaps = time_gap_bucket_array(out["query_times"] - out["times"])
    query_gaps[out["ids"] == 0] = 0
    return Batchable(
        query_gaps=query_gaps,
        ids=out["ids"],
        times=out["times"],
        query_times=out["query_times"],
        ratings=out["ratings"],
        gaps=out["gaps"],
        lengths=lengths,
        targets=targets,
        target_ratings=target_ratings,
        users=np.asarray([u for u, _ in rows_spec], dtype=np.int64),
        long_ids=long_ids,
        long_times=long_times,
    )


def iterate_batches(split: Batchable, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None,
                    drop_last: bool = False, trim: bool = True):
    """Yield dicts of numpy arrays, each as wide as its longest row needs (``trim``); shuffled when training."""
    index = np.arange(len(split))
    if shuffle:
        (rng or np.random.default_rng()).shuffle(index)
    stop = len(index) - (len(index) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        chunk = index[start : start + batch_size]
        if len(chunk):
            yield split.rows(chunk, trim=trim)


def history_row(items: np.ndarray, times: np.ndarray, ratings: np.ndarray, max_len: int, max_long: int = 0,
                query_time: int = 0) -> dict[str, np.ndarray]:
    """One model input (a batch of one row) for the event after ``items``, laid out as :func:`make_split`
    lays out a valid/test row: the last ``max_len`` events, older ones (up to ``max_long``) as long-term
    input, and ``query_time`` (epoch seconds; the request time when serving) as the last position's query.

    Serving builds its input with this, so a served user is encoded exactly as the evaluator encodes them.
    """
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    items, times, ratings = (np.asarray(a, dtype=np.int64) for a in (items, times, ratings))
    if not len(items) == len(times) == len(ratings):
        raise ValueError("items, times and ratings must have the same length")
    end = len(items)
    start = max(0, end - max_len)
    n = end - start
    E = max(max_long, 1)
    row = {k: np.zeros((1, max_len), dtype=np.int64) for k in ("ids", "times", "query_times", "ratings", "gaps")}
    row["ids"][0, :n] = items[start:end]
    row["times"][0, :n] = times[start:end]
    row["ratings"][0, :n] = ratings[start:end]
    row["gaps"][0, :n] = time_gap_buckets(times)[start:end] if end else 0
    row["query_times"][0, :n] = np.append(times[start + 1 : end], query_time) if n else 0
    query_gaps = time_gap_bucket_array(row["query_times"] - row["times"])
    query_gaps[row["ids"] == 0] = 0
    row["query_gaps"] = query_gaps
    row["lengths"] = np.asarray([n], dtype=np.int64)
    row["long_ids"] = np.zeros((1, E), dtype=np.int64)
    row["long_times"] = np.zeros((1, E), dtype=np.int64)
    if max_long > 0 and start > 0:
        ls = max(0, start - max_long)
        row["long_ids"][0, : start - ls] = items[ls:start]
        row["long_times"][0, : start - ls] = times[ls:start]
    return row
