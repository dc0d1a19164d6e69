"""The untrained anchors of the cold-start bench (bench/cold_start.py), on the same test rows as its `ugt train` runs.

* ``popularity``: training-event counts of the held-out view (items that arrive after training have none, so
  they are never recommended: what a popularity fallback gives new items).
* ``content_knn``: a content-only recommender over every item, new ones included: each item is a unit vector of
  its genres, release decade and semantic-ID codes (one-hot per level, when the run has codes); a user's query is
  the mean of the vectors of their last ``recent`` items; a faiss exact inner-product index ranks the catalog.

Both rank the full catalog with the input window masked, as `ugt train`'s evaluation does (models/eval.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import yaml

from models.checkpoint import load_data, long_history_len
from models.data import SequenceData, cold_item_mask, make_split
from models.semantic_stage import semantic_codes
from models.train_config import load_config

RECENT = 5  # the history items a content-kNN query averages


def content_vectors(data: SequenceData, codes: np.ndarray | None) -> np.ndarray:
    """(V + 1, F) float32 unit rows: genres (multi-hot) | decade (one-hot) | one-hot code per semantic-ID level."""
    V = data.num_items + 1
    parts = []
    genres = np.zeros((V, int(data.item_genres.max()) + 1), np.float32)
    np.put_along_axis(genres, data.item_genres, 1.0, axis=1)
    parts.append(genres[:, 1:])
    decade = np.zeros((V, int(data.item_year_bucket.max()) + 1), np.float32)
    decade[np.arange(V), data.item_year_bucket] = 1.0
    parts.append(decade[:, 1:])
    if codes is not None:
        for level in range(codes.shape[1]):
            onehot = np.zeros((V, int(codes[:, level].max()) + 1), np.float32)
            onehot[np.arange(V), codes[:, level]] = 1.0
            parts.append(onehot)
    out = np.concatenate(parts, axis=1)
    out[0] = 0.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(scores, row indices, engine) of the top ``k`` rows by inner product: a faiss flat index, or the same exact
    search in numpy where faiss is not installed (a GPU machine without the serving extras)."""
    try:
        import faiss
    except ImportError:
        scores = queries @ vectors.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1), top, "numpy"
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    scores, found = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, found, "faiss"


def _ranks_in_lists(lists: np.ndarray, scores: np.ndarray, ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target in its list after dropping the row's window items and padding; 0 = not listed."""
    ranks = np.zeros(len(targets), np.int64)
    for r, (row, target) in enumerate(zip(lists, targets, strict=True)):
        window = set(ids[r][ids[r] > 0].tolist())
        kept = [i for i, s in zip(row.tolist(), scores[r].tolist(), strict=True) if i > 0 and i not in window
                and np.isfinite(s)]
        if target in kept:
            ranks[r] = kept.index(target) + 1
    return ranks


def _accuracy(ranks: np.ndarray) -> dict[str, float]:
    found = ranks > 0
    out = {f"hr@{k}": float((found & (ranks <= k)).mean()) for k in (10, 50, 200)}
    out["ndcg@10"] = float(np.where(found & (ranks <= 10), 1 / np.log2(np.maximum(ranks, 1) + 1), 0.0).mean())
    return out


def _split_report(ranks: np.ndarray, is_cold: np.ndarray) -> dict[str, Any]:
    return {"test": {"users": len(ranks), **_accuracy(ranks)},
            "test_cold": {"users": int(is_cold.sum()), **_accuracy(ranks[is_cold])},
            "test_warm": {"users": int((~is_cold).sum()), **_accuracy(ranks[~is_cold])}}


def anchors(config: str, cold_spec: dict, overrides: list[str], depth: int = 200) -> list[dict[str, Any]]:
    """Rows (bench/cold_start.py's shape) for popularity and content kNN on the config's test split."""
    sets = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in overrides)}
    cfg = load_config(config, {k: v for k, v in sets.items() if k in ("semantic_ids", "max_users", "tie_order")})
    data = load_data(cfg)
    cold = cold_item_mask(data, cold_spec)
    test = make_split(data, "test", cfg.max_len, long_history_len(cfg))
    is_cold = cold[test.targets]
    k = depth + cfg.max_len  # room for the masked window items
    pop = np.zeros(data.num_items + 1)
    for seq in data.items:  # the held-out view's training events: new items have none
        np.add.at(pop, seq[:-2][~cold[seq[:-2]]], 1)
    order = np.argsort(-pop[1:], kind="stable")[:k] + 1
    pop_ranks = _ranks_in_lists(np.tile(order, (len(test), 1)), np.tile(pop[order], (len(test), 1)), test.ids,
                                test.targets)
    codes = semantic_codes(cfg, data)[0] if "artifact" in (cfg.semantic_ids or {}) else None
    vectors = content_vectors(data, codes)
    recent = np.zeros((len(test), vectors.shape[1]), np.float32)
    for r, n in enumerate(test.lengths):
        recent[r] = vectors[test.ids[r, max(0, n - RECENT) : n]].mean(0)
    scores, found, engine = exact_search(vectors[1:], recent, k)
    knn_ranks = _ranks_in_lists(np.where(found >= 0, found + 1, 0), scores, test.ids, test.targets)
    content = "genres + decade" + (" + semantic-ID codes" if codes is not None else "")
    return [{"run": "popularity", "anchor": "training-event counts (new items have none)",
             **_split_report(pop_ranks, is_cold)},
            {"run": "content_knn", "anchor": f"{engine} exact inner product over {content}, query = mean of the "
                                             f"last {RECENT} items", **_split_report(knn_ranks, is_cold)}]
