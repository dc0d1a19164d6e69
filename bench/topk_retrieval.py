"""Exact top-k retrieval at 100k and 1M items: the engine's one-pass path (the anchor) against the blocked one.

    python -m bench.topk_retrieval                       # CPU, fp32 (the CPU engine's dtype), + faiss IndexFlatIP
    python -m bench.topk_retrieval --device cuda --compile   # GPU, bf16: CUDA events, eager and CUDA-graph replay
    bash bench/gpu_serving.sh topk [ARGS]                # the GPU run -> $OUT/topk_retrieval_gpu.json

Per (items V, dim d, batch B, k): random L2-normalised item vectors (V + 1 rows, row 0 the padding item), random
user states, ``--excl`` random exclusions per row (unique, 0-padded, as a history). Variants:

* ``plain``: :func:`models.ugt.runner.retrieval.retrieve` with no block: one (B, V + 1) score matrix, a scatter of
  the exclusions, one top-k over every column (what the engine did for every catalog before).
* ``blocked_<n>``: the same function with ``block = n`` (:mod:`models.ugt.runner.blocked_topk`): a matmul, the
  mask and a top-k per block of n items, then a top-k of the (B, blocks x k) candidates.
* ``blocked_<n>_compiled`` (``--compile``): that under ``torch.compile`` (recompiled per shape, compile time not
  timed but recorded).
* ``faiss_flat_ip`` (CPU, exact, a reference): ``faiss.IndexFlatIP`` over items 1..V searched for k + X, then the
  row's exclusions dropped; the filtering is timed with it. Timed after the torch variants, not among them (two
  OpenMP runtimes taking turns on 2 cores slow each other down by 10-100x).

Each variant is timed after ``--warmup`` rounds as the median of ``--repeats``, in rounds that call every variant
once (CUDA: CUDA events; CPU: perf_counter). On CUDA each is also captured as a CUDA graph and replayed (``graph_ms``), as the engine's heads
graph runs it. ``recall_at_k`` is measured against the plain path's items (never assumed); ``max_value_diff`` the
largest difference of the sorted returned scores. In bf16 (GPU) scores tie, so an exact variant can pick another of
two equal-scored items: recall may read below 1 while ``max_value_diff`` is 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, result_path, write_result  # noqa: E402

Answer = tuple[torch.Tensor, torch.Tensor]  # (scores, items) (B, k)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def make_table(items: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """(V + 1, d) L2-normalised random item vectors in ``dtype`` (row 0: the padding item)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(items + 1, dim, generator=gen), dim=-1).to(device, dtype)


def make_queries(items: int, dim: int, batch: int, excl: int, device: torch.device,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(users (B, d) fp32, exclusions (B, X) unique per row, duplicates turned into 0 padding)."""
    gen = torch.Generator().manual_seed(seed + 1)
    users = torch.randn(batch, dim, generator=gen).to(device)
    ex = torch.randint(1, items + 1, (batch, excl), generator=gen).sort(1).values
    ex[:, 1:][ex[:, 1:] == ex[:, :-1]] = 0
    return users, ex.to(device)


def call_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one ``fn()`` (CUDA events on the GPU, perf_counter on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_ms(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                   repeats: int) -> dict[str, float]:
    """Median ms of each ``fn()``, timed in rounds that call every one once (a load that comes and goes on a shared
    machine then weighs on all alike), after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            ms = call_ms(fn, device)
            if round_ >= warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def agreement(got: Answer, want: Answer) -> dict[str, float]:
    """Recall@k of ``got``'s items against the plain path's, and the largest gap between their sorted scores."""
    gv, gi = got
    wv, wi = want
    hits = (gi[:, :, None] == wi[:, None, :]).any(-1).float().sum(1) / wi.shape[1]
    diff = (gv.float().sort(1, descending=True).values - wv.float().sort(1, descending=True).values).abs()
    return {"recall_at_k": float(hits.mean()), "max_value_diff": float(diff.nan_to_num(0.0).max())}


def faiss_index(table: torch.Tensor, items: int) -> Any:
    """faiss IndexFlatIP (exact, CPU) over items 1..V (its ids are item index - 1)."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(table.shape[1])
    index.add(table[1 : items + 1].float().numpy())
    return index


def faiss_variant(index: Any, k: int) -> Callable[[torch.Tensor, torch.Tensor], Answer]:
    """The k + X nearest of ``index``, the row's exclusions dropped: the first k allowed, in score order."""

    def search(users: torch.Tensor, excl: torch.Tensor) -> Answer:
        scores, ids = index.search(users.float().numpy(), k + excl.shape[1])
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids) + 1
        banned = (ids[:, :, None] == excl[:, None, :]).any(-1) | (ids <= 0)
        keep = banned.to(torch.int8).argsort(dim=1, stable=True)[:, :k]
        return scores.gather(1, keep), ids.gather(1, keep)

    return search


def variants(args: argparse.Namespace, table: torch.Tensor, items: int, k: int,
             index: Any) -> dict[str, tuple[int, Callable[[torch.Tensor, torch.Tensor], Answer]]]:
    """name -> (block, fn(users, excl) -> (scores, items)) of every variant this case runs."""
    from models.ugt.runner.retrieval import retrieve

    def engine(block: int) -> Callable[[torch.Tensor, torch.Tensor], Answer]:
        return lambda u, x: retrieve(u, x, table, items, k, block)[:2]

    out = {"plain": (0, engine(0))}
    for block in args.blocks:
        if block <= items:
            out[f"blocked_{block}"] = (block, engine(block))
    if args.compile and args.compile_block <= items:
        torch._dynamo.reset()
        block = args.compile_block
        compiled = torch.compile(retrieve)
        out[f"blocked_{block}_compiled"] = (block, lambda u, x: compiled(u, x, table, items, k, block)[:2])
    if index is not None:
        out["faiss_flat_ip"] = (0, faiss_variant(index, k))
    return out


def first_call(row: dict[str, Any], fn: Callable, users: torch.Tensor, excl: torch.Tensor, reference: Answer,
               device: torch.device) -> None:
    """Into ``row``: the first call's seconds (a compiled variant compiles), agreement with the plain path, and on
    CUDA the call's peak memory above what was allocated before it."""
    t0 = time.perf_counter()
    got = fn(users, excl)
    row["first_call_s"] = time.perf_counter() - t0
    row.update(agreement(got, reference))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(users, excl)
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def graphs_of(fns: dict[str, Callable], users: torch.Tensor, excl: torch.Tensor,
              rows: dict[str, dict[str, Any]]) -> dict[str, Callable[[], Any]]:
    """Each variant captured once as a CUDA graph, as a replay (inputs copied in, as the engine does); a variant
    that cannot be captured gets a ``graph_error`` instead."""
    from models.ugt.runner.graphs import capture, replay

    out = {}
    for name, fn in fns.items():
        try:
            captured = capture(fn, users, excl)
        except (RuntimeError, ValueError) as exc:
            rows[name]["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        out[name] = lambda c=captured: replay(c, users, excl)
    return out


def run_case(table: torch.Tensor, index: Any, batch: int, k: int, args: argparse.Namespace,
             device: torch.device) -> list[dict[str, Any]]:
    """Every variant at one (V, d, B, k), timed in interleaved rounds; speed-ups against the plain path's ms."""
    items, dim = table.shape[0] - 1, table.shape[1]
    users, excl = make_queries(items, dim, batch, args.excl, device, args.seed)
    case = {"items": items, "dim": dim, "batch": batch, "k": k}
    runs = variants(args, table, items, k, index)
    reference = runs["plain"][1](users, excl)
    reference = (reference[0].clone(), reference[1].clone())
    rows: dict[str, dict[str, Any]] = {}
    live: dict[str, Callable] = {}
    for name, (block, fn) in runs.items():
        rows[name] = {**case, "variant": name, "block": block or None}
        try:
            first_call(rows[name], fn, users, excl, reference, device)
            live[name] = fn
        except (RuntimeError, ValueError, AssertionError) as exc:  # one variant failing is a result, not the end
            rows[name]["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    eager = {name: (lambda f=fn: f(users, excl)) for name, fn in live.items()}
    # faiss alone, after the torch variants: its OpenMP threads (a second runtime beside torch's) spin after each
    # call, and interleaved with torch's on 2 cores they slowed both by 10-100x
    apart = {name: eager.pop(name) for name in list(eager) if name.startswith("faiss")}
    for group in (eager, apart):
        for name, ms in interleaved_ms(group, device, args.warmup, args.repeats).items():
            rows[name]["ms"] = ms
    if device.type == "cuda" and args.graphs:
        replays = graphs_of(live, users, excl, rows)
        for name, ms in interleaved_ms(replays, device, args.warmup, args.repeats).items():
            rows[name]["graph_ms"] = ms
        del replays
    plain = rows["plain"]
    for row in rows.values():
        for col in ("ms", "graph_ms"):
            if row.get(col) and plain.get(col):
                row[f"speedup_{col}"] = plain[col] / row[col]  # plain ms / this ms: > 1 is faster than plain
    del runs, live, eager
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--items", type=int_list, default=[100_000, 1_000_000], help="catalog sizes V")
    p.add_argument("--dims", type=int_list, default=[64, 256])
    p.add_argument("--batches", type=int_list, default=None, help="default: CUDA 8,64,128,512; CPU 8,64,128")
    p.add_argument("--ks", type=int_list, default=[10], help="e.g. 10,100")
    p.add_argument("--blocks", type=int_list, default=None,
                   help="block sizes tried (default: CPU 4096,16384,65536; CUDA 16384,32768,65536,131072,262144)")
    p.add_argument("--excl", type=int, default=128, help="exclusions per row (a history's items)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds after the first call (default CPU 0, CUDA 5)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls, median (default CPU 3, CUDA 30)")
    p.add_argument("--no-faiss", dest="faiss", action="store_false", help="CPU: skip faiss IndexFlatIP")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="CUDA: skip CUDA-graph replay")
    p.add_argument("--compile", action="store_true", help="also the blocked path under torch.compile")
    p.add_argument("--compile-block", type=int, default=65536, help="the block of the compiled variant")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch (and faiss) threads; 1 = the serving default (torch_threads); 0 = torch's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default bench/results/topk_retrieval[_gpu].json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # what the engine serves in (config dtype "auto")
    args.blocks = args.blocks or ([16384, 32768, 65536, 131072, 262144] if cuda else [4096, 16384, 65536])
    args.batches = args.batches or ([8, 64, 128, 512] if cuda else [8, 64, 128])
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 0)
    args.repeats = args.repeats or (30 if cuda else 3)
    run(args, device, dtype, argv)


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, argv: list[str] | None) -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU machine: a printed line per (V, d) instead of a bar
        tqdm = None
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    cases = [(v, d) for v in args.items for d in args.dims]
    load_before = os.getloadavg()
    rows = []
    total = len(cases) * len(args.batches) * len(args.ks)
    bar = tqdm(total=total, desc="cases", unit="case") if tqdm else None
    with torch.inference_mode():
        for items, dim in cases:  # one table (and faiss index) per (V, d), every (B, k) over it
            if bar is None:
                print(f"{len(rows)} rows done; now V {items:,}, d {dim}", flush=True)
            table = make_table(items, dim, dtype, device, args.seed)
            index = faiss_index(table, items) if device.type == "cpu" and args.faiss else None
            for batch in args.batches:
                for k in args.ks:
                    rows.extend(run_case(table, index, batch, k, args, device))
                    if bar is not None:
                        bar.update()
            del table, index
    if bar is not None:
        bar.close()
    print_table(rows, ["items", "dim", "batch", "k", "variant", "ms", "graph_ms", "speedup_ms", "speedup_graph_ms",
                       "recall_at_k", "max_value_diff", "peak_mib", "error"])
    conditions = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "anchor": "plain",
        "torch_threads": torch.get_num_threads(), "faiss_threads": torch.get_num_threads() if args.faiss else None, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "exclusions_per_row": args.excl, "seed": args.seed,
        "warmup": args.warmup, "repeats": args.repeats, "statistic": "median ms per batch",
        "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "data": "item vectors: L2-normalised N(0, 1), V + 1 rows (row 0 padding); users N(0, 1); exclusions "
                "uniform random items, duplicates 0-padded",
        "speedup": "plain ms / variant ms (> 1: faster than plain), eager and graph replay separately",
        "recall": "recall@k of each variant's items against the plain path's, measured",
    }
    name = "topk_retrieval_gpu" if device.type == "cuda" else "topk_retrieval"
    write_result(args.out or result_path(name), "topk_retrieval", conditions, {"rows": rows},
                 argv, "python -m bench.topk_retrieval")


if __name__ == "__main__":
    main()
