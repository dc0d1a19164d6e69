"""Ranking and beyond-accuracy metrics (HSTU protocol: full ranking over all items, 1-based ranks).

Accuracy comes from the rank of the held-out item among all candidates (items of the user's history
masked): HR@K = 1[rank <= K], NDCG@K = 1[rank <= K] / log2(rank + 1), MRR = 1 / rank. HSTU's eval
caps ranks at its top-2,500 list (rank 2,501 beyond it); we keep exact ranks, which changes MRR only in
the fourth decimal on ML-1M. Beyond-accuracy metrics read the top-K lists and item metadata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_KS = (5, 10, 20, 50, 200)  # @5 / @20 as papers on short-sequence datasets report


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each target among all columns of ``scores`` [B, V] (ties count against it).

    ``invalid`` [B, V] bool marks masked candidates (padding, history); the target is never masked.
    """
    scores = scores.float().clone()
    if invalid is not None:
        invalid = invalid.clone()
        invalid[torch.arange(len(targets), device=scores.device), targets] = False
        scores.masked_fill_(invalid, float("-inf"))
    target_scores = scores.gather(1, targets.view(-1, 1))
    # Ties count against the target (a constant scorer ranks it last, never first).
    return (scores >= target_scores).sum(dim=1)


def accuracy_from_ranks(ranks: np.ndarray | torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR over examples."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to average")
    if (r < 1).any():
        raise ValueError("ranks are 1-based")
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean())
    out["mrr"] = float((1.0 / r).mean())
    return out


def intra_list_distance(top: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance between the items of each list, averaged over lists."""
    if top.shape[1] < 2:
        return 0.0
    v = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=1, keepdims=True), 1e-12)
    total = 0.0
    for row in top:
        e = v[row]
        sim = e @ e.T
        k = len(row)
        total += (k * k - sim.sum()) / (k * (k - 1))  # mean of (1 - cos) over ordered pairs i != j
    return float(total / len(top))


def genre_diversity(top: np.ndarray, item_genres: np.ndarray) -> float:
    """Mean number of distinct genres per list, as a share of all genres (0..1)."""
    num_genres = int(item_genres.max()) if item_genres.size else 0
    if num_genres == 0:
        return 0.0
    shares = []
    for row in top:
        g = item_genres[row].ravel()
        shares.append(len(set(g[g > 0].tolist())) / num_genres)
    return float(np.mean(shares))


def recommendation_counts(top: np.ndarray, num_items: int) -> np.ndarray:
    """How often each item index (1..num_items) is recommended; index 0 (padding) dropped."""
    return np.bincount(top.ravel(), minlength=num_items + 1)[1:]


def entropy(top: np.ndarray, num_items: int) -> float:
    """Shannon entropy (bits) of the distribution of recommended items over all lists."""
    c = recommendation_counts(top, num_items).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum())


def novelty(top: np.ndarray, popularity: np.ndarray) -> float:
    """Mean self-information -log2 p(i) of recommended items; p = share of users' interactions.

    ``popularity`` is indexed by item index (0 = padding); unseen items get count 1 (add-one).
    """
    p = (popularity.astype(np.float64) + 1.0) / (popularity.sum() + len(popularity))
    return float(-np.log2(p[top]).mean())


def long_tail_share(top: np.ndarray, popularity: np.ndarray, head_share: float = 0.2) -> float:
    """Share of recommendations outside the head: the most popular items holding ``head_share`` of items."""
    pop = popularity[1:]
    order = np.argsort(-pop, kind="stable")
    head = set((order[: max(1, int(math.ceil(head_share * len(pop))))] + 1).tolist())
    flat = top.ravel()
    return float(np.mean([i not in head for i in flat.tolist()]))


def coverage(top: np.ndarray, num_items: int) -> float:
    """Share of the catalog recommended to at least one user."""
    return float((recommendation_counts(top, num_items) > 0).mean())


def gini(top: np.ndarray, num_items: int) -> float:
    """Gini index of recommendation counts over the catalog (0 = even, 1 = one item takes all)."""
    c = np.sort(recommendation_counts(top, num_items).astype(np.float64))
    n = len(c)
    if n == 0 or c.sum() == 0:
        return 0.0
    index = np.arange(1, n + 1)
    return float(((2 * index - n - 1) * c).sum() / (n * c.sum()))


def beyond_accuracy(top: np.ndarray, num_items: int, popularity: np.ndarray, item_genres: np.ndarray,
                    item_vectors: np.ndarray | None = None) -> dict[str, float]:
    """All list-level metrics for top-K lists ``top`` [U, K] of item indices."""
    out = {
        "genre_diversity": genre_diversity(top, item_genres),
        "entropy": entropy(top, num_items),
        "novelty": novelty(top, popularity),
        "long_tail_share": long_tail_share(top, popularity),
        "coverage": coverage(top, num_items),
        "gini": gini(top, num_items),
    }
    if item_vectors is not None:
        out["ild"] = intra_list_distance(top, item_vectors)
    else:
        # Genre-based ILD: 1 - Jaccard similarity of genre sets, when no embeddings are given.
        out["ild"] = genre_ild(top, item_genres)
    return out


def genre_ild(top: np.ndarray, item_genres: np.ndarray) -> float:
    """Mean pairwise (1 - Jaccard) distance of the items' genre sets within each list."""
    num_genres = int(item_genres.max()) if item_genres.size else 0
    if top.shape[1] < 2 or num_genres == 0:
        return 0.0
    onehot = np.zeros((len(item_genres), num_genres + 1), dtype=np.float64)
    rows = np.repeat(np.arange(len(item_genres)), item_genres.shape[1])
    onehot[rows, item_genres.ravel()] = 1.0
    onehot[:, 0] = 0.0
    total = 0.0
    for row in top:
        m = onehot[row]
        inter = m @ m.T
        size = m.sum(1)
        union = size[:, None] + size[None, :] - inter
        dist = 1.0 - np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        k = len(row)
        total += (dist.sum() - np.trace(dist)) / (k * (k - 1))
    return float(total / len(top))
