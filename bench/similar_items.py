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
import json
import os
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
    p.add_argument("--scale", type=int, default=100_000, help="also a synthetic catalog of this many items made "
                   "from the real vectors (0: none)")
    p.add_argument("--noise", type=float, default=0.5, help="relative noise of the synthetic items")
    p.add_argument("--queries", type=int, default=2000, help="queries on the synthetic catalog (sampled items)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/similar_items.json")
    return p.parse_args(argv)


def default_checkpoint() -> Path:
    from bench.serving import ensure_checkpoint
    from infra.settings import get_settings

    return ensure_checkpoint(get_settings().cache_dir)


def timed_queries(index, vectors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(top-k + 1 positions of each query row, p50 and p99 ms of one query at a time)."""
    for row in rows[:200]:  # warm-up
        index.search(vectors[row][None], K + 1)
    found = np.zeros((len(rows), K + 1), np.int64)
    took = np.zeros(len(rows))
    for i, row in enumerate(rows):
        started = time.perf_counter()
        found[i] = index.search(vectors[row][None], K + 1)[1][0]
        took[i] = time.perf_counter() - started
    return found, float(np.percentile(took, 50) * 1000), float(np.percentile(took, 99) * 1000)


def without_self(found: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each query's top-K other than the query item itself."""
    out = np.full((len(found), K), -1, np.int64)
    for i, (hits, row) in enumerate(zip(found, rows, strict=True)):
        others = [p for p in hits.tolist() if p != row][:K]
        out[i, : len(others)] = others
    return out


def scaled(vectors: np.ndarray, items: int, noise: float, seed: int) -> np.ndarray:
    """A synthetic catalog of ``items`` vectors: real ones drawn with replacement, each moved by Gaussian noise of
    relative size ``noise`` and renormalised (a larger catalog with the real one's geometry)."""
    rng = np.random.default_rng(seed)
    base = vectors[rng.integers(0, len(vectors), items)]
    moved = base + noise * rng.normal(size=base.shape).astype(np.float32) / np.sqrt(base.shape[1])
    return (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)


def measure(vectors: np.ndarray, rows: np.ndarray, args: argparse.Namespace, label: str) -> list[dict]:
    """One index per kind built from ``vectors``; each search setting measured on the ``rows`` queries."""
    import faiss

    from models.similar import IndexConfig, exact_top, recall_at_k
    from models.similar.index import make_index

    faiss.omp_set_num_threads(1)
    exact = without_self(exact_top(vectors, vectors[rows], K + 1), rows)
    out = []
    for kind, knob, values in (("flat", None, [None]), ("hnsw", "ef_search", args.ef_search.split(",")),
                               ("ivf", "nprobe", args.ivf_probe.split(","))):
        started = time.perf_counter()
        index = make_index(vectors.shape[1], IndexConfig(kind=kind, hnsw_m=args.hnsw_m), vectors)
        index.add(np.ascontiguousarray(vectors))
        build_s = time.perf_counter() - started
        for value in values:
            name = kind
            if knob == "ef_search":
                index.hnsw.efSearch = int(value)
                name = f"hnsw M={args.hnsw_m} efSearch={value}"
            elif knob == "nprobe":
                index.nprobe = min(int(value), index.nlist)
                name = f"ivf lists={index.nlist} nprobe={value}"
            found, p50, p99 = timed_queries(index, vectors, rows)
            out.append({"catalog": label, "items": len(vectors), "index": name, "kind": kind,
                        **({knob: int(value)} if knob else {}),
                        f"recall@{K}": round(recall_at_k(without_self(found, rows), exact), 5),
                        "query_p50_ms": round(p50, 4), "query_p99_ms": round(p99, 4), "build_s": round(build_s, 3)})
    return out


def checkpoint_summary(checkpoint: Path) -> dict:
    """What the run's summary.json says of the model (its recipe and test quality), if it is beside it."""
    path = checkpoint.parent / "summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    test = summary.get("test") or {}
    return {"epochs_run": summary.get("epochs_run"), "device": summary.get("device"),
            "test_hr@10": test.get("hr@10"), "test_ndcg@10": test.get("ndcg@10")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from models.similar import ItemTables, VectorWeights
    from models.similar.vectors import trained_vectors

    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    tables = ItemTables.from_checkpoint(checkpoint)
    vectors = trained_vectors(tables, VectorWeights())
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    load_before = os.getloadavg()[0]
    rows = measure(vectors, np.arange(len(vectors)), args, "real")
    if args.scale:
        big = scaled(vectors, args.scale, args.noise, args.seed)
        queries = np.random.default_rng(args.seed + 1).choice(len(big), min(args.queries, len(big)), replace=False)
        rows += measure(big, np.sort(queries), args, "synthetic")
    print_table(rows, ["catalog", "items", "index", f"recall@{K}", "query_p50_ms", "query_p99_ms", "build_s"])
    parts = [name for name, table in (("ID rows", tables.collab), ("semantic-ID codes", tables.code_table),
                                      ("genres", tables.genre_table), ("decade", tables.year_table))
             if table is not None]
    conditions = {
        "checkpoint": str(checkpoint), "dataset": ckpt["config"]["dataset"], "model": ckpt["config"]["name"],
        "model_summary": checkpoint_summary(checkpoint), "items": len(tables.item_ids), "dim": int(vectors.shape[1]),
        "vector_parts": parts, "weights": {"collab": 1.0, "content": 1.0},
        "queries": "real: every item's own vector, itself left out; synthetic: sampled items, themselves left out",
        "synthetic": {"items": args.scale, "noise": args.noise, "queries": args.queries, "seed": args.seed},
        "reference": "exact inner-product search (faiss IndexFlatIP)", "threads": 1, "k": K,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    served = next(r for r in rows if r["catalog"] == "real" and r.get("ef_search") == 128)
    write_result(args.out, "similar_items", conditions,
                 {"rows": rows, f"recall@{K}": served[f"recall@{K}"], "served_index": served["index"]}, argv, PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
