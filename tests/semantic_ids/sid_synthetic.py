"""Synthetic catalogs for the semantic-ID tests (fast, offline, deterministic).

A uniquely named module (not conftest) so `import` finds it whichever test folders are on sys.path."""

from __future__ import annotations

import numpy as np

GENRES = ["Action", "Adventure", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation", "War"]
WORDS = "red blue night day love war star king queen city dark light game story man woman ghost river sea sky".split()


def make_items(n: int, seed: int = 0, prefix: str = "") -> list[dict]:
    """Movie-like items shaped like load_dataset(...).items rows."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        items.append(
            {
                "item_id": f"{prefix}{i + 1}",
                "title": " ".join(rng.choice(WORDS, 2 + i % 3).tolist()).title(),
                "year": int(rng.integers(1930, 2001)) if i % 17 else None,
                "genres": sorted(rng.choice(GENRES, 1 + i % 3, replace=False).tolist()),
            }
        )
    return items


def clustered(n: int = 600, dim: int = 48, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Gaussian clusters at the small scale fused item vectors have."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return (0.05 * x).astype(np.float32)


STRUCTURED_ONLY = {
    "quantizer": "rqkmeans",
    "codebook_sizes": [8, 8],
    "dedup_size": 32,
    "encoders": [{"type": "structured", "weight": 1.0, "hash_dim": 8}],
    "compare_baseline": False,
    "embedding_cache": "off",
    "progress": False,
}
