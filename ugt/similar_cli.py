"""`ugt similar`: build the similar-items index from a trained UGT checkpoint, or query one.

    ugt similar build --checkpoint runs/ugt-ml1m-demo/checkpoint.pt --out runs/similar/ml1m-demo
    ugt similar query runs/similar/ml1m-demo 2571 --k 10

Serving loads the folder when its config names it (`similar_index:`, docs/SERVING.md "Similar items").
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

RECALL_SAMPLE = 2000  # items whose top-10 is compared with exact search after a build


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    build = sub.add_parser(
        "build", help="embed every trained item (ID rows + content) and write a faiss index folder",
        description="Read a `ugt train` checkpoint's item tables, make each item's vector (its collaborative ID row "
        "and its content: semantic-ID code embeddings + genres + decade, each half L2-normalised and weighted), "
        "index them with faiss and write manifest.json + index.faiss + arrays.npz to --out. Prints recall@10 "
        "against exact search on a sample.")
    build.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by `ugt train` (a UGT model)")
    build.add_argument("--out", required=True, help="index folder to write (created; its files are replaced)")
    build.add_argument("--kind", choices=["hnsw", "ivf", "flat"], default="hnsw", help="faiss index (default hnsw)")
    build.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    build.add_argument("--ef-construction", type=int, default=200, help="HNSW build-time beam")
    build.add_argument("--ef-search", type=int, default=128, help="HNSW query-time beam")
    build.add_argument("--ivf-lists", type=int, default=0, help="IVF lists (0: 4 * sqrt(items), at most items / 39)")
    build.add_argument("--ivf-probe", type=int, default=8, help="IVF lists searched per query")
    build.add_argument("--collab-weight", type=float, default=1.0, help="weight of the ID-row half")
    build.add_argument("--content-weight", type=float, default=1.0, help="weight of the content half")
    build.add_argument("--quiet", action="store_true", help="no progress bar")

    query = sub.add_parser("query", help="print an item's nearest items from an index folder",
                           description="Load an index folder (checksums verified) and print the k items nearest "
                           "to ITEM_ID with their inner products.")
    query.add_argument("index", help="index folder (`ugt similar build --out`)")
    query.add_argument("item_id", help="an item id the index holds")
    query.add_argument("--k", type=int, default=10, help="how many neighbours (default 10)")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run_build(args: argparse.Namespace) -> int:
    from models.similar import IndexConfig, ItemTables, SimilarIndex, VectorWeights, exact_top, recall_at_k

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        print(f"ugt similar build: no such checkpoint {str(checkpoint)!r} (train one with `ugt train`)",
              file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        tables = ItemTables.from_checkpoint(checkpoint)
        config = IndexConfig(kind=args.kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                             ef_search=args.ef_search, ivf_lists=args.ivf_lists, ivf_probe=args.ivf_probe)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        print(f"ugt similar build: cannot use {str(checkpoint)!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    weights = VectorWeights(collab=args.collab_weight, content=args.content_weight)
    source = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": _file_hash(checkpoint)}
    with tqdm(total=len(tables.item_ids), unit="item", desc="indexing", disable=args.quiet) as bar:
        index = SimilarIndex.build(tables, weights, config, progress=bar.update, source=source)
    built_s = time.perf_counter() - started
    rows = np.random.default_rng(0).permutation(len(index.item_ids))[:RECALL_SAMPLE]
    exact = exact_top(index.vectors, index.vectors[rows], 10)
    recall = recall_at_k(index.search(index.vectors[rows], 10)[1], exact)
    out = index.save(args.out)
    parts = ["ID rows" if tables.collab is not None else None,
             "semantic-ID codes" if tables.code_table is not None else None,
             "genres" if tables.genre_table is not None else None, "decade" if tables.year_table is not None else None]
    print(tabulate([
        ["items", len(index.item_ids)], ["vector dim", index.vectors.shape[1]],
        ["parts", ", ".join(p for p in parts if p)], ["index", config.kind],
        [f"recall@10 vs exact ({len(rows)} items)", f"{recall:.4f}"],
        ["new items embeddable", tables.embeds_new_items], ["built in", f"{built_s:.1f} s"], ["written", str(out)],
    ], tablefmt="plain"))
    return 0


def run_query(args: argparse.Namespace) -> int:
    from models.similar import SimilarIndex, SimilarIndexError

    try:
        index = SimilarIndex.load(args.index)
    except SimilarIndexError as exc:
        print(f"ugt similar query: {exc}", file=sys.stderr)
        return 1
    if args.item_id not in index.position:
        print(f"ugt similar query: item {args.item_id!r} is not in the index ({len(index.item_ids)} items)",
              file=sys.stderr)
        return 1
    rows = index.neighbours(args.item_id, max(1, args.k))
    print(tabulate(rows, headers=["item_id", "score"], floatfmt=".4f"))
    return 0


def run(args: argparse.Namespace) -> int:
    return run_build(args) if args.action == "build" else run_query(args)
