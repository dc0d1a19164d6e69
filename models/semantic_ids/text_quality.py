"""How good is a text encoder for semantic IDs? Look at each item's nearest text neighbours.

Two numbers per encoder on a dataset with ratings (used to pick the default text model):
  * genre Jaccard@k: do the k nearest titles share the item's genres?
  * co-rating cosine@k: do they share its audience (cosine of the items' binary user vectors)? Compared with
    random pairs, this says whether text similarity predicts behaviour, which is what the generator needs.
Items with fewer than ``min_ratings`` ratings are skipped (their audience vector is noise).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.semantic_ids.encoders_text import TextEncoder
from models.semantic_ids.items import items_from_frame


def neighbour_quality(
    embeddings: np.ndarray, genres: Sequence[Sequence[str]], audience: np.ndarray, k: int = 10, min_ratings: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """``audience`` is the [items, users] 0/1 matrix (float32) in the same row order as ``embeddings``."""
    counts = audience.sum(1)
    rows = np.flatnonzero(counts >= min_ratings)
    if len(rows) <= k:
        raise ValueError(f"only {len(rows)} items have >= {min_ratings} ratings; need more than k={k}")
    e = embeddings[rows] / np.maximum(np.linalg.norm(embeddings[rows], axis=1, keepdims=True), 1e-12)
    e = e - e.mean(0)  # same centring the fusion layer applies
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argpartition(-sims, k, axis=1)[:, :k]  # (n, k) positions within rows
    aud = audience[rows] / np.sqrt(np.maximum(counts[rows], 1.0))[:, None]
    co = np.einsum("nu,nku->nk", aud, aud[neighbours]).mean()
    rng = np.random.default_rng(seed)
    random_pairs = rng.integers(len(rows), size=(len(rows), k))
    co_random = np.einsum("nu,nku->nk", aud, aud[random_pairs]).mean()
    sets = [set(genres[r]) for r in rows]
    jac = np.mean([[len(sets[i] & sets[j]) / max(len(sets[i] | sets[j]), 1) for j in nb] for i, nb in enumerate(neighbours)])
    return {
        "items": int(len(rows)),
        "k": k,
        "genre_jaccard": float(jac),
        "co_rating_cosine": float(co),
        "co_rating_cosine_random": float(co_random),
    }


def compare_text_encoders(dataset: Any, specs: Sequence[dict[str, Any]], k: int = 10) -> list[dict[str, Any]]:
    """Encode the dataset's item texts with each text-encoder spec; speed plus :func:`neighbour_quality`."""
    items = items_from_frame(dataset.items)
    row = {it["item_id"]: i for i, it in enumerate(items)}
    users = {u: j for j, u in enumerate(dataset.ratings["user_id"].unique())}
    audience = np.zeros((len(items), len(users)), np.float32)
    known = dataset.ratings["item_id"].map(row)
    mask = known.notna().to_numpy()
    audience[
        known[mask].astype(int).to_numpy(), dataset.ratings["user_id"][mask].map(users).to_numpy()
    ] = 1.0
    genres = [it["genres"] for it in items]
    results = []
    for spec in specs:
        encoder = TextEncoder(**spec)
        start = time.perf_counter()
        encoder.encode(items[:2])  # open the model outside the timing
        opened = time.perf_counter() - start
        start = time.perf_counter()
        emb = np.concatenate([encoder.encode(items[i : i + 256]) for i in range(0, len(items), 256)])
        seconds = time.perf_counter() - start
        results.append(
            {"encoder": spec, "open_seconds": opened, "items_per_s": len(items) / seconds,
             **neighbour_quality(emb, genres, audience, k=k)}
        )
    return results
