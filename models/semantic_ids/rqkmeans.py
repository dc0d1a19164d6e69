"""RQ-k-means: residual k-means, the baseline quantizer (OneRec's choice) and RQ-VAE's codebook init.

Level l runs k-means on what levels < l left over. No training loop and no decoder, so it is fast and
stable; RQ-VAE can beat it by learning the latent space the codebooks live in. faiss k-means is used when
faiss is installed (fast, multi-threaded); a numpy Lloyd's loop with k-means++ seeding otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from models.semantic_ids.codebooks import ResidualQuantizer, nearest_codeword

log = logging.getLogger(__name__)


@dataclass
class RQKMeansConfig:
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    niter: int = 25  # Lloyd iterations per level
    seed: int = 0
    backend: str = "auto"  # auto | faiss | numpy

    def __post_init__(self) -> None:
        if not self.codebook_sizes or any(int(k) < 1 for k in self.codebook_sizes):
            raise ValueError(f"codebook_sizes must be a non-empty list of positive ints, got {self.codebook_sizes}")
        if self.backend not in ("auto", "faiss", "numpy"):
            raise ValueError(f"rqkmeans backend must be auto, faiss or numpy, got {self.backend!r}")


def _faiss():
    try:
        import faiss

        return faiss
    except ImportError:
        return None


def _kmeans_numpy(x: np.ndarray, k: int, niter: int, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    # k-means++ seeding: spread the first centroids out so few start dead
    centroids = np.empty((k, x.shape[1]), np.float32)
    centroids[0] = x[rng.integers(n)]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        idx = rng.integers(n) if total <= 0 else rng.choice(n, p=d2 / total)
        centroids[j] = x[idx]
        d2 = np.minimum(d2, ((x - centroids[j]) ** 2).sum(1))
    for _ in range(niter):
        assign = nearest_codeword(x, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        alive = counts > 0
        centroids[alive] = sums[alive] / counts[alive, None]
        if (~alive).any():  # re-seed empty clusters at the points worst served
            dist = ((x - centroids[assign]) ** 2).sum(1)
            worst = np.argsort(-dist)[: int((~alive).sum())]
            centroids[~alive] = x[worst]
    return centroids


def kmeans(x: np.ndarray, k: int, niter: int = 25, seed: int = 0, backend: str = "auto") -> np.ndarray:
    """``(k, d)`` centroids. With fewer distinct points than k, the spare centroids copy points (they stay unused)."""
    x = np.ascontiguousarray(x, np.float32)
    rng = np.random.default_rng(seed)
    n_distinct = len(np.unique(x, axis=0)) if len(x) <= 200_000 else len(x)
    k_fit = min(k, n_distinct)
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise RuntimeError("rqkmeans backend 'faiss' asked for, but faiss is not installed (pip install faiss-cpu)")
    if k_fit == n_distinct:
        centroids = np.unique(x, axis=0)[:k_fit].astype(np.float32)
    elif faiss is not None:
        # small problems run faster on one thread than with OpenMP threads spinning on a busy box
        threads = faiss.omp_get_max_threads()
        if len(x) * k_fit < 20_000_000:
            faiss.omp_set_num_threads(1)
        try:
            km = faiss.Kmeans(x.shape[1], k_fit, niter=niter, seed=seed, verbose=False, max_points_per_centroid=1 << 20)
            km.train(x)
        finally:
            faiss.omp_set_num_threads(threads)
        centroids = np.asarray(km.centroids, np.float32)
    else:
        centroids = _kmeans_numpy(x, k_fit, niter, rng)
    if k_fit < k:
        spare = x[rng.integers(len(x), size=k - k_fit)]
        centroids = np.concatenate([centroids, spare]).astype(np.float32)
    return centroids


def residual_kmeans(
    z: np.ndarray, codebook_sizes: Sequence[int], niter: int = 25, seed: int = 0, backend: str = "auto"
) -> list[np.ndarray]:
    """One codebook per level, each fit on the residual the previous levels leave."""
    residual = np.array(z, np.float32, copy=True)
    books = []
    for level, k in enumerate(codebook_sizes):
        book = kmeans(residual, int(k), niter=niter, seed=seed + level, backend=backend)
        residual -= book[nearest_codeword(residual, book)]
        books.append(book)
    return books


def fit_rqkmeans(x: np.ndarray, config: RQKMeansConfig) -> tuple[ResidualQuantizer, dict]:
    """Fit on fused item vectors ``x``; returns the quantizer and a small training log."""
    start = time.perf_counter()
    books = residual_kmeans(x, config.codebook_sizes, config.niter, config.seed, config.backend)
    info = {
        "method": "rqkmeans",
        "config": asdict(config),
        "backend": "faiss" if (config.backend != "numpy" and _faiss() is not None) else "numpy",
        "train_seconds": time.perf_counter() - start,
    }
    log.info("rq-kmeans %s fitted in %.1fs", config.codebook_sizes, info["train_seconds"])
    return ResidualQuantizer(books), info
