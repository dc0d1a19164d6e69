"""Similar items: recall@10 of the faiss index (HNSW, IVF) against exact search, and what a query costs.

The vectors are the ones `ugt similar build` indexes (models/similar: a trained UGT's ID rows + its content
part, each half normalised) for every catalog item of the checkpoint. Every item is a query; the reference is
a flat inner-product scan (exact). Each index kind is built from the same vectors; per-query latency is one
query at a time on one thread (as serving asks), over every item, after a warm-up pass.

    python bench/similar_items.py --checkpoint runs/similar-ml1m-demo/checkpoint.pt
    python bench/similar_items.py            # trains the tiny ML-100K model once (~20 s) and uses that
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repo's packages importable
    sys.path.insert(0, str(REPO))
from bench.common import print_table, write_result  # noqa: E402

PROG = "python bench/similar_items.py"
K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a `ugt train` checkpoint.pt (default: the tiny ML-100K model, trained once "
                   "into the bench cache)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (the build CLI's default)")
    p.add_argument("--ef-search", default="16,32,64,128", help="comma list of HNSW efSearch values to measure")
    p.add_argument("--ivf-probe", default="1,4,8,16", help="comma list of IVF nprobe values to measure")
    p.add_argument("--out", default="bench/results/similar_items.json")
    return p.parse_args(argv)


def default_checkpoint() -> Path:
    from bench.serving import ensure_checkpoint
    from infra.settings import get_settings

    return ensure_checkpoint(get_settings().cache_dir)


def timed_queries(index, vectors: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(top-k positions of every query, p50 and p99 ms of one query at a time)."""
    for row in vectors[: min(200, len(vectors))]:  # warm-up
        index.search(row[None], K + 1)
    found = np.zeros((len(vectors), K + 1), np.int64)
    took = np.zeros(len(vectors))
    for i, row in enumerate(vectors):
        started = time.perf_counter()
        found[i] = index.search(row[None], K + 1)[1][0]
        took[i] = time.perf_counter() - started
    return found, float(np.percentile(took, 50) * 1000), float(np.percentile(took, 99) * 1000)


def without_self(found: np.ndarray) -> np.ndarray:
    """Each row's top-K other than the query itself (row i is item i's query)."""
    out = np.zeros((len(found), K), np.int64)
    for i, row in enumerate(found):
        others = [p for p in row.tolist() if p != i][:K]
        out[i, : len(others)] = others
        out[i, len(others):] = -1
    return out


def measure(vectors: np.ndarray, args: argparse.Namespace) -> list[dict]:
    import faiss

    from models.similar import IndexConfig, exact_top, recall_at_k
    from models.similar.index import make_index

    faiss.omp_set_num_threads(1)
    exact = without_self(exact_top(vectors, vectors, K + 1))
    runs: list[tuple[str, IndexConfig, dict]] = [("flat", IndexConfig(kind="flat"), {})]
    runs += [(f"hnsw M={args.hnsw_m} efSearch={ef}", IndexConfig(kind="hnsw", hnsw_m=args.hnsw_m, ef_search=int(ef)),
              {"ef_search": int(ef)}) for ef in args.ef_search.split(",")]
    runs += [(f"ivf nprobe={p}", IndexConfig(kind="ivf", ivf_probe=int(p)), {"nprobe": int(p)})
             for p in args.ivf_probe.split(",")]
    rows = []
    for name, config, knobs in runs:
        started = time.perf_counter()
        index = make_index(vectors.shape[1], config, vectors)
        index.add(np.ascontiguousarray(vectors))
        build_s = time.perf_counter() - started
        found, p50, p99 = timed_queries(index, vectors)
        rows.append({"index": name, "kind": config.kind, **knobs, f"recall@{K}": round(recall_at_k(
            without_self(found), exact), 5), "query_p50_ms": round(p50, 4), "query_p99_ms": round(p99, 4),
            "build_s": round(build_s, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from models.similar import ItemTables, VectorWeights
    from models.similar.vectors import trained_vectors

    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    tables = ItemTables.from_checkpoint(checkpoint)
    vectors = trained_vectors(tables, VectorWeights())
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    rows = measure(vectors, args)
    print_table(rows, ["index", f"recall@{K}", "query_p50_ms", "query_p99_ms", "build_s"])
    parts = [name for name, table in (("ID rows", tables.collab), ("semantic-ID codes", tables.code_table),
                                      ("genres", tables.genre_table), ("decade", tables.year_table))
             if table is not None]
    conditions = {
        "checkpoint": str(checkpoint), "dataset": ckpt["config"]["dataset"], "model": ckpt["config"]["name"],
        "items": len(tables.item_ids), "dim": int(vectors.shape[1]), "vector_parts": parts,
        "weights": {"collab": 1.0, "content": 1.0}, "queries": "every item, its own vector, itself left out",
        "reference": "exact inner-product search (faiss IndexFlatIP)", "threads": 1, "k": K,
    }
    hnsw = [r for r in rows if r["kind"] == "hnsw"]
    default = next((r for r in hnsw if r.get("ef_search") == 128), hnsw[-1] if hnsw else rows[0])
    write_result(args.out, "similar_items", conditions,
                 {"rows": rows, f"recall@{K}_served": default[f"recall@{K}"], "served_index": default["index"]},
                 argv, PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
