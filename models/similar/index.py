"""The similar-items index: faiss (HNSW by default) over item vectors, saved as a checked artifact folder.

HNSW because it takes items one at a time with no retraining (new items join the graph as they arrive) and
keeps recall near exact at catalog sizes where a flat scan would cost a millisecond per query; ``ivf`` (an
inverted file, trained k-means lists) and ``flat`` (exact) are there for comparison (bench/similar_items.py).

The artifact: ``manifest.json`` (format, config, counts, the checkpoint it came from, sha256 of the other two
files), ``index.faiss`` and ``arrays.npz`` (item ids, vectors, and the tables that embed new items). A missing,
truncated or changed file raises :class:`SimilarIndexError` saying which and to rebuild.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models.semantic_ids.artifact import sha256_file
from models.similar.vectors import ItemTables, VectorWeights, new_item_vectors, trained_vectors

FORMAT = "ugt-similar-items/1"
INDEX_KINDS = ("hnsw", "ivf", "flat")
MANIFEST, INDEX_FILE, ARRAYS = "manifest.json", "index.faiss", "arrays.npz"
TABLE_KEYS = ("collab", "genre_table", "genres", "year_table", "years", "code_table", "codes")
CHUNK = 4096  # items added per step (the progress bar's unit)


class SimilarIndexError(ValueError):
    """The artifact cannot be used; the message names the file and says to rebuild."""


@dataclass(frozen=True)
class IndexConfig:
    """faiss settings: ``hnsw`` (M links per node, efConstruction, efSearch), ``ivf`` (lists, probes), ``flat``."""

    kind: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    ivf_lists: int = 0  # 0: 4 * sqrt(items), at most items / 39
    ivf_probe: int = 8

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")


def make_index(dim: int, config: IndexConfig, train: np.ndarray) -> faiss.Index:
    """An empty inner-product index (IVF trained on ``train``)."""
    if config.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
        return index
    # 4 * sqrt(n) lists, but at least 39 training points per list (faiss's k-means minimum)
    lists = config.ivf_lists or max(1, min(int(4 * np.sqrt(len(train))), len(train) // 39))
    lists = min(lists, len(train))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, np.float32))
    index.nprobe = min(config.ivf_probe, lists)
    return index


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions (n, k) of each query's k best inner products by a flat scan: the reference for recall."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, np.float32))
    return flat.search(np.ascontiguousarray(queries, np.float32), k)[1]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of ``exact`` that ``found`` holds (same k)."""
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True)]
    return float(np.mean(hits) / exact.shape[1]) if len(hits) else 0.0


@dataclass
class SimilarIndex:
    """Item ids, their vectors and a faiss index over them (positions = rows of ``vectors``)."""

    index: faiss.Index
    item_ids: list[str]
    vectors: np.ndarray
    tables: ItemTables
    weights: VectorWeights = field(default_factory=VectorWeights)
    config: IndexConfig = field(default_factory=IndexConfig)
    source: dict[str, Any] = field(default_factory=dict)  # where it was built from (checkpoint path, hash)

    def __post_init__(self) -> None:
        self.position = {item: i for i, item in enumerate(self.item_ids)}

    @property
    def trained_items(self) -> int:
        return len(self.tables.item_ids)

    @classmethod
    def build(cls, tables: ItemTables, weights: VectorWeights | None = None, config: IndexConfig | None = None,
              progress: Callable[[int], None] | None = None, source: dict[str, Any] | None = None) -> SimilarIndex:
        """Embed every trained item and index it; ``progress(n)`` after each chunk of n items."""
        weights, config = weights or VectorWeights(), config or IndexConfig()
        vectors = trained_vectors(tables, weights)
        index = make_index(vectors.shape[1], config, vectors)
        for start in range(0, len(vectors), CHUNK):
            index.add(np.ascontiguousarray(vectors[start : start + CHUNK]))
            if progress is not None:
                progress(len(vectors[start : start + CHUNK]))
        source = {**(source or {}), "semantic_ids_version": tables.sid_version}
        return cls(index, list(tables.item_ids), vectors, tables, weights, config, source)

    # -- queries ---------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the k nearest rows to each query; position -1 where fewer exist."""
        k = max(1, min(k, len(self.item_ids)))
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    def neighbours(self, item_id: str, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """Up to k (item id, inner product) nearest to ``item_id``, best first, never itself or ``exclude``.

        Raises KeyError for an item the index does not hold.
        """
        row = self.position[item_id]
        skip = set(exclude) | {item_id}
        scores, positions = self.search(self.vectors[row : row + 1], k + len(skip))
        out = []
        for score, pos in zip(scores[0].tolist(), positions[0].tolist(), strict=True):
            if pos >= 0 and self.item_ids[pos] not in skip:
                out.append((self.item_ids[pos], float(score)))
                if len(out) == k:
                    break
        return out

    # -- new items -------------------------------------------------------------------------------------
    def add_new_items(self, item_ids: Sequence[str], codes: np.ndarray, genres: np.ndarray,
                      years: np.ndarray) -> int:
        """Index items coded after training (by content: they have no ID row); known ids are skipped."""
        keep = [i for i, item in enumerate(item_ids) if item not in self.position]
        if not keep:
            return 0
        vectors = new_item_vectors(self.tables, self.weights, np.asarray(codes)[keep], np.asarray(genres)[keep],
                                   np.asarray(years)[keep])
        self.add_vectors([item_ids[i] for i in keep], vectors)
        return len(keep)

    def add_vectors(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        start = len(self.item_ids)
        self.index.add(np.ascontiguousarray(vectors, np.float32))
        self.vectors = np.concatenate([self.vectors, vectors.astype(np.float32)])
        for offset, item in enumerate(item_ids):
            self.item_ids.append(item)
            self.position[item] = start + offset

    # -- the artifact ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the artifact (manifest last, so a half-written folder never loads)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        faiss.write_index(self.index, str(out / INDEX_FILE))
        t = self.tables
        arrays = {k: getattr(t, k) for k in TABLE_KEYS if getattr(t, k) is not None}
        np.savez(out / ARRAYS, item_ids=np.asarray(self.item_ids, dtype=str),
                 trained_ids=np.asarray(t.item_ids, dtype=str), vectors=self.vectors, **arrays)
        manifest = {
            "format": FORMAT, "items": len(self.item_ids), "dim": int(self.vectors.shape[1]),
            "config": asdict(self.config), "weights": asdict(self.weights), "source": self.source,
            "codebook_sizes": t.codebook_sizes, "genre_names": t.genre_names,
            "sha256": {INDEX_FILE: sha256_file(out / INDEX_FILE), ARRAYS: sha256_file(out / ARRAYS)},
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> SimilarIndex:
        """Load and verify an artifact; SimilarIndexError (naming the file) when it cannot be used."""
        root = Path(folder)
        fix = "rebuild it with `ugt similar build --checkpoint ... --out ...`"
        manifest = _manifest(root, fix)
        for name, digest in manifest.get("sha256", {}).items():
            path = root / name
            if not path.is_file():
                raise SimilarIndexError(f"similar-items index {str(root)!r}: {name} is missing: {fix}")
            if sha256_file(path) != digest:
                raise SimilarIndexError(f"similar-items index {str(root)!r}: {name} does not match its checksum "
                                        f"(truncated or changed): {fix}")
        try:
            index = faiss.read_index(str(root / INDEX_FILE))
            with np.load(root / ARRAYS) as z:
                arrays = {k: z[k] for k in z.files}
            tables = ItemTables(
                item_ids=arrays["trained_ids"].tolist(), collab=arrays.get("collab"),
                genre_table=arrays.get("genre_table"), genres=arrays["genres"], year_table=arrays.get("year_table"),
                years=arrays["years"], code_table=arrays.get("code_table"), codes=arrays.get("codes"),
                codebook_sizes=list(manifest["codebook_sizes"]), genre_names=list(manifest["genre_names"]),
                sid_version=str((manifest.get("source") or {}).get("semantic_ids_version") or ""))
            config = IndexConfig(**{f.name: manifest["config"][f.name] for f in fields(IndexConfig)})
            weights = VectorWeights(**manifest["weights"])
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            raise SimilarIndexError(f"similar-items index {str(root)!r} cannot be read ({type(exc).__name__}: "
                                    f"{exc}): {fix}") from exc
        if index.ntotal != len(arrays["item_ids"]) or len(arrays["vectors"]) != index.ntotal:
            raise SimilarIndexError(f"similar-items index {str(root)!r}: {index.ntotal} indexed vectors for "
                                    f"{len(arrays['item_ids'])} items: {fix}")
        if config.kind == "hnsw":
            index.hnsw.efSearch = config.ef_search
        return cls(index, arrays["item_ids"].tolist(), arrays["vectors"].astype(np.float32), tables, weights,
                   config, dict(manifest.get("source") or {}))


def _manifest(root: Path, fix: str) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise SimilarIndexError(f"similar-items index {str(root)!r} does not exist (a folder): {fix}")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SimilarIndexError(f"similar-items index {str(root)!r} has no {MANIFEST} (not built, or the build "
                                f"stopped): {fix}") from None
    except (OSError, ValueError) as exc:
        raise SimilarIndexError(f"similar-items index {str(root)!r}: {MANIFEST} is not JSON ({exc}): {fix}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SimilarIndexError(f"similar-items index {str(root)!r} is of format {found!r}, this code reads "
                                f"{FORMAT!r}: {fix}")
    return manifest
