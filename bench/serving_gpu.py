"""GPU generator benchmark: the UGT generator alone (models.ugt.inference), batched, beside a naive anchor.

Two model sizes: the trained ML-1M UGT (a checkpoint from `ugt train`, or trained here for --train-minutes
first; its HR@10 is reported, as eval computes it and as the serving engine ranks it) and an industrial
size (8 layers, d = 256, history 1,024, 1M items, random weights). Per size, in the same run:

  naive-eager   plain dense-attention PyTorch stack (reference attention, (B, H, N, N) scores), bf16, eager
  naive-graph   the same, captured in CUDA graphs per batch size
  fused-graph   Triton HSTU attention (bias in the kernel) + CUDA graphs: every request a full prefill
  kvcache       the user's prefix K/V cached: a request runs only its last event through the stack (+ graphs)
  kvcache+beam  kvcache plus semantic-ID beam search (trie-constrained), merged with retrieval by RRF; the
                heads (retrieval, beam, fusion) replayed as one CUDA graph per shape
  kvcache+beam-eager-heads  the same with the heads' kernels launched one by one (ablation)
  kvcache+beam-pipelined    kvcache+beam with two batches in flight
  kvcache-pipelined  kvcache with two batches in flight: the host packs batch i+1 (cache lookup, pinned
                copy) while the GPU runs batch i (UGTInference.submit_packed / Pending.result)

Each runs a batch sweep (time per batch from host rows to top-k on the host; p50/p99/p99.9 over batches;
qps = batch / mean), then the optimised variants run open-loop at fixed Poisson rates (a request's latency
= its wait for the batch + the batch), and a per-stage split (pack, H2D, stack, retrieval, beam, D2H).

    python bench/serving_gpu.py --configs ml1m --checkpoint runs/ugt/checkpoint.pt
    python bench/serving_gpu.py --configs industrial
    python bench/serving_gpu.py --smoke          # small sizes, seconds: the code path on any GPU
bench/serving.py --target gpu calls run_gpu_bench(args).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import git_commit, print_table, utc_now, write_result  # noqa: E402
from bench.serving_gpu_workloads import industrial_model, industrial_pool, ml1m_pool, train_ml1m  # noqa: E402
from models.ugt.inference import InferenceConfig, UGTInference  # noqa: E402
from models.ugt.model import UGT  # noqa: E402

COLUMNS = ["config", "variant", "batch", "qps", "p50_ms", "p99_ms", "p999_ms"]
OPEN_COLUMNS = ["config", "variant", "offered_qps", "qps", "p50_ms", "p99_ms", "p999_ms", "mean_batch"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ml1m,industrial", help="comma list of ml1m, industrial")
    p.add_argument("--checkpoint", default="", help="trained ML-1M UGT checkpoint (else --train-minutes)")
    p.add_argument("--train-minutes", type=float, default=0.0, help="train the ML-1M UGT here first")
    p.add_argument("--train-out", default="runs/serving-gpu-ugt", help="where that training run writes")
    p.add_argument("--batches", default="1,8,32,128,256,512", help="batch sweep (also the CUDA graph buckets)")
    p.add_argument("--variants", default="naive-eager,naive-graph,fused-graph,kvcache,kvcache+beam,"
                                         "kvcache+beam-eager-heads,kvcache-pipelined,kvcache+beam-pipelined",
                   help="comma list; kvcache+rank (the target-aware ranking head over retrieval's top --rank-top) "
                        "runs where the model has a ranking head")
    p.add_argument("--k", type=int, default=100, help="items per request (candidates for the reranker)")
    p.add_argument("--beam", type=int, default=100, help="beam size of kvcache+beam")
    p.add_argument("--rank-top", type=int, default=100,
                   help="kvcache+rank: retrieval candidates the target-aware ranking head reorders")
    p.add_argument("--seconds", type=float, default=1.0, help="time per sweep point")
    p.add_argument("--rates-ml1m", default="50000,100000,150000", help="open-loop rates (req/s), ML-1M")
    p.add_argument("--rates-industrial", default="5000,10000,20000", help="open-loop rates (req/s), industrial")
    p.add_argument("--open-seconds", type=float, default=2.0, help="duration of one open-loop rate")
    p.add_argument("--users", type=int, default=2048, help="distinct users (KV cache slots) in the industrial pool")
    p.add_argument("--items", type=int, default=1_000_000, help="industrial catalog size")
    p.add_argument("--history", type=int, default=1024, help="industrial history length")
    p.add_argument("--naive-max-batch", type=int, default=128, help="largest batch the naive variants run")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and short runs (a code-path check)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the code path (no graphs, fp32)")
    p.add_argument("--out", default="bench/results/serving_gpu.json")
    p.add_argument("--merge", action="store_true", help="keep other configs' rows already in --out")
    return p.parse_args(argv)


# ---- measurement ---------------------------------------------------------------------------------------


def excludes_of(rows: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """What a served request masks here: the items in its input window (eval's mask_history=window)."""
    return [np.unique(r["ids"][0][r["ids"][0] > 0]) for r in rows]


def percentiles(ms: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "p999_ms": float(np.percentile(a, 99.9))}


def engine_for(model: UGT, variant: str, args: argparse.Namespace, n_users: int) -> UGTInference:
    buckets = tuple(int(b) for b in args.batches.split(","))
    base = {"device": args.device, "batch_buckets": buckets}
    if variant == "naive-eager":
        return UGTInference(model, InferenceConfig(**base, fused_attention=False, cuda_graphs=False))
    if variant == "naive-graph":
        return UGTInference(model, InferenceConfig(**base, fused_attention=False))
    if variant == "fused-graph":
        return UGTInference(model, InferenceConfig(**base))
    if variant in ("kvcache", "kvcache-pipelined"):
        return UGTInference(model, InferenceConfig(**base, cache_slots=n_users))
    if variant in ("kvcache+beam", "kvcache+beam-pipelined"):
        return UGTInference(model, InferenceConfig(**base, cache_slots=n_users, beam_size=args.beam, merge="rrf"))
    if variant == "kvcache+beam-eager-heads":  # ablation: the heads' kernels launched one by one, as before
        return UGTInference(model, InferenceConfig(**base, cache_slots=n_users, beam_size=args.beam, merge="rrf",
                                                   heads_graph=False))
    if variant == "kvcache+rank":
        return UGTInference(model, InferenceConfig(**base, cache_slots=n_users, rank_top=args.rank_top))
    raise SystemExit(f"unknown variant {variant!r}")


class Pool:
    """Requests to draw batches from, pre-packed the way a service would hold them after the state fetch:
    rows in the engine's packed layout, their exclusions, user keys and prefix fingerprints."""

    def __init__(self, rows: list[dict[str, np.ndarray]], engine: UGTInference):
        self.rows = rows
        self.excl = excludes_of(rows)
        self.vectors = engine.row_vectors(rows)
        self.excl_matrix = engine.exclusion_matrix(self.excl)
        self.keys = [f"u{i}" for i in range(len(rows))]
        self.prints = [str(i).encode() for i in range(len(rows))]  # the prefix never changes in this bench
        self.cursor = 0

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, list, list]:
        idx = (self.cursor + np.arange(n)) % len(self.rows)
        self.cursor = (self.cursor + n) % len(self.rows)
        return (self.vectors[idx], self.excl_matrix[idx], [self.keys[i] for i in idx],
                [self.prints[i] for i in idx])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def call(engine: UGTInference, pool: Pool, n: int, k: int) -> None:
    vectors, excl, keys, prints = pool.take(n)
    engine.recommend_packed(vectors, excl, k, keys, prints)


def submit(engine: UGTInference, pool: Pool, n: int, k: int):
    vectors, excl, keys, prints = pool.take(n)
    return engine.submit_packed(vectors, excl, k, keys, prints)


def sweep_pipelined(engine: UGTInference, pool: Pool, batch: int, k: int, seconds: float) -> dict[str, float]:
    """Closed loop with two batches in flight: batch i+1 is packed and queued before batch i is read back.
    Latency of a batch = its submit start -> its top-k on the host; qps = requests / wall time."""
    for _ in range(3):
        call(engine, pool, batch, k)
    sync()
    times: list[float] = []
    with no_gc():
        t_begin = time.perf_counter()
        t_end = t_begin + seconds
        prev, prev_t = None, 0.0
        while (time.perf_counter() < t_end or len(times) < 5) and len(times) < 5000:
            t0 = time.perf_counter()
            pending = submit(engine, pool, batch, k)
            if prev is not None:
                prev.result()
                times.append((time.perf_counter() - prev_t) * 1e3)
            prev, prev_t = pending, t0
        prev.result()
        times.append((time.perf_counter() - prev_t) * 1e3)
        wall = time.perf_counter() - t_begin
    return {"batch": batch, "qps": batch * len(times) / wall, **percentiles(times), "batches": len(times)}


def open_loop_pipelined(engine: UGTInference, pool: Pool, rate: float, seconds: float, k: int) -> dict[str, float]:
    """open_loop with two batches in flight: whatever arrived is submitted, then the previous batch is read
    back (so the host prepares one batch while the GPU runs the other). Latency = completion - arrival."""
    max_batch = max(engine.config.batch_buckets)
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds)))
    lat: list[np.ndarray] = []
    sizes = []
    i, n = 0, len(arrivals)
    inflight = None  # (Pending, its requests' arrival times)
    with no_gc():
        t0 = time.perf_counter()
        while i < n or inflight is not None:
            now = time.perf_counter() - t0
            new = None
            if i < n and arrivals[i] <= now:
                j = min(int(np.searchsorted(arrivals, now, side="right")), i + max_batch)
                new = (submit(engine, pool, j - i, k), arrivals[i:j])
                sizes.append(j - i)
                i = j
            elif inflight is None:
                time.sleep(max(0.0, arrivals[i] - now - 50e-6))
                continue
            if inflight is not None:
                inflight[0].result()
                lat.append((time.perf_counter() - t0 - inflight[1]) * 1e3)
            inflight = new
        total = time.perf_counter() - t0
    return {"offered_qps": rate, "qps": n / total, **percentiles(np.concatenate(lat)), "mean_batch": float(np.mean(sizes))}


def warm_cache(engine: UGTInference, pool: Pool, k: int) -> None:
    """One prefill per user so the timed requests hit the KV cache (the prefix has not changed)."""
    if engine.cache is None:
        return
    step = max(b for b in engine.config.batch_buckets)
    for _ in range(0, len(pool.rows), step):
        call(engine, pool, min(step, len(pool.rows)), k)
    pool.cursor = 0


@contextlib.contextmanager
def no_gc():
    """Timed loops run with the garbage collector off (objects so far frozen), as a latency-minded server would:
    a full collection over the pools' many small objects is a multi-ms pause that lands in the tail."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def sweep(engine: UGTInference, pool: Pool, batch: int, k: int, seconds: float) -> dict[str, float]:
    """Closed loop at a fixed batch: ms per batch, host rows in -> top-k lists on the host."""
    for _ in range(3):
        call(engine, pool, batch, k)
    sync()
    times: list[float] = []
    with no_gc():
        t_end = time.perf_counter() + seconds
        while (time.perf_counter() < t_end or len(times) < 5) and len(times) < 5000:
            t0 = time.perf_counter()
            call(engine, pool, batch, k)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"batch": batch, "qps": batch / (np.mean(times) / 1e3), **percentiles(times), "batches": len(times)}


def open_loop(engine: UGTInference, pool: Pool, rate: float, seconds: float, k: int) -> dict[str, float]:
    """Poisson arrivals at ``rate``; each step serves every request that has arrived (up to the largest
    bucket) in one batch. Latency = completion - arrival, so queueing behind a busy GPU counts."""
    max_batch = max(engine.config.batch_buckets)
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds)))
    lat: list[np.ndarray] = []
    sizes = []
    i, n = 0, len(arrivals)
    with no_gc():
        t0 = time.perf_counter()
        while i < n:
            now = time.perf_counter() - t0
            if arrivals[i] > now:
                time.sleep(max(0.0, arrivals[i] - now - 50e-6))
                continue
            j = min(int(np.searchsorted(arrivals, now, side="right")), i + max_batch)
            call(engine, pool, j - i, k)
            done = time.perf_counter() - t0
            lat.append((done - arrivals[i:j]) * 1e3)
            sizes.append(j - i)
            i = j
        total = time.perf_counter() - t0
    return {"offered_qps": rate, "qps": n / total, **percentiles(np.concatenate(lat)), "mean_batch": float(np.mean(sizes))}


@torch.inference_mode()
def stage_split(engine: UGTInference, pool: Pool, batch: int, k: int, reps: int = 20) -> dict[str, float]:
    """Median ms per stage of one batch: pack (host), H2D, stack (prefill/decode), retrieval, beam, D2H."""
    stages: dict[str, list[float]] = {s: [] for s in ("pack", "h2d", "stack", "retrieval", "beam", "d2h")}
    for _ in range(reps):
        vectors, excl, keys, prints = pool.take(batch)
        sync()
        t = [time.perf_counter()]
        if engine.cache is not None:
            slots, hits = engine.cache.assign(keys, prints)
        else:
            slots, hits = [0] * batch, [False] * batch
        decode = engine.cache is not None and all(hits)
        if decode:  # as submit_packed: only the last events cross
            host = engine.pack_compact(vectors, excl, slots, engine.bucket(batch))
        else:
            host = engine.pack(vectors, excl, slots, engine.bucket(batch))
        t.append(time.perf_counter())
        dev = host.to(engine.device, non_blocking=True)
        sync()
        t.append(time.perf_counter())
        user = engine.step("decode_compact" if decode else "prefill", dev)[:batch]
        excl_dev = engine.exclusions(dev, compact=decode)[:batch]
        sync()
        t.append(time.perf_counter())
        values, indices, counts = engine.retrieve(user, excl_dev, k)
        sync()
        t.append(time.perf_counter())
        if engine.config.merge == "rrf":
            values, indices = engine.rrf(user, excl_dev, indices, k)
        sync()
        t.append(time.perf_counter())
        values.cpu(), indices.cpu(), counts.cpu()
        t.append(time.perf_counter())
        for name, a, b in zip(stages, t[:-1], t[1:], strict=True):
            stages[name].append((b - a) * 1e3)
    return {f"{name}_ms": float(np.median(v)) for name, v in stages.items()}


@torch.inference_mode()
def engine_hr(engine: UGTInference, pool: Pool, targets: np.ndarray, batch: int = 512) -> dict[str, float]:
    """HR@10 / NDCG@10 of the serving engine's own top-10 (bf16, graphs) on the test rows."""
    hits, ndcg = [], []
    for start in range(0, len(pool.rows), batch):
        rows = pool.rows[start : start + batch]
        tops = engine.recommend(rows, pool.excl[start : start + batch], 10)
        for top, target in zip(tops, targets[start : start + batch], strict=True):
            where = np.nonzero(top.indices == target)[0]
            hits.append(len(where) > 0)
            ndcg.append(1.0 / np.log2(where[0] + 2.0) if len(where) else 0.0)
    return {"hr@10": float(np.mean(hits)), "ndcg@10": float(np.mean(ndcg)), "users": len(hits)}


def bench_config(name: str, model: UGT, rows: list, args: argparse.Namespace, rates: list[float],
                 targets: np.ndarray | None = None) -> dict[str, Any]:
    """All variants of one model size: sweep rows, open-loop rows, stage split, (HR@10 of the engine)."""
    out: dict[str, Any] = {"rows": [], "open_loop": [], "stages": {}}
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if model.sid_head is None:
        variants = [v for v in variants if not v.startswith("kvcache+beam")]
    if model.ranker is None:
        variants = [v for v in variants if v != "kvcache+rank"]
    for variant in variants:
        engine = engine_for(model, variant, args, len(rows))
        pool = Pool(rows, engine)
        if targets is not None and variant in ("kvcache", "kvcache+rank"):
            key = "engine_quality" if variant == "kvcache" else "engine_quality_ranked"
            out[key] = engine_hr(engine, pool, targets)
            print(f"[{name}] serving engine {variant} (bf16) test HR@10 {out[key]['hr@10']:.4f}", flush=True)
        warm_cache(engine, pool, args.k)
        for b in batches:
            if variant.startswith("naive") and b > args.naive_max_batch:
                continue
            try:
                run_sweep = sweep_pipelined if variant.endswith("pipelined") else sweep
                r = run_sweep(engine, pool, b, args.k, args.seconds)
            except torch.cuda.OutOfMemoryError as exc:
                print(f"[{name}] {variant} batch {b}: out of GPU memory ({exc})", flush=True)
                torch.cuda.empty_cache()
                break
            row = {"config": name, "variant": variant, **r}
            out["rows"].append(row)
            print(f"[{name}] {variant:13s} batch {b:4d}: {r['qps']:>10,.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms", flush=True)
        split_batch = min(128, max(batches))
        out["stages"][variant] = {"batch": split_batch, **stage_split(engine, pool, split_batch, args.k)}
        if variant == "kvcache" and max(batches) > split_batch:  # where the time goes at the largest batch
            out["stages"][f"{variant}@{max(batches)}"] = {
                "batch": max(batches), **stage_split(engine, pool, max(batches), args.k)}
        if variant in ("fused-graph", "kvcache", "kvcache+beam", "kvcache-pipelined", "kvcache+rank",
                       "kvcache+beam-pipelined", "kvcache+beam-eager-heads"):
            run_open = open_loop_pipelined if variant.endswith("pipelined") else open_loop
            for rate in rates:
                r = run_open(engine, pool, rate, args.open_seconds, args.k)
                out["open_loop"].append({"config": name, "variant": variant, **r})
                print(f"[{name}] {variant} open loop {rate:,.0f}/s: {r['qps']:,.0f} served, p50 {r['p50_ms']:.2f} "
                      f"p99 {r['p99_ms']:.2f} p99.9 {r['p999_ms']:.2f} ms, mean batch {r['mean_batch']:.0f}",
                      flush=True)
        del engine
        torch.cuda.empty_cache()
    return out


def describe(model: UGT) -> dict[str, Any]:
    c = model.config
    return {"layers": c.num_layers, "d_model": c.d_model, "heads": c.num_heads, "dqk": c.dqk, "dv": c.dv,
            "history": c.multiscale.recent_len, "long_groups": c.multiscale.long_groups if model.compressor else 0,
            "items": c.num_items, "moe": f"{c.moe.num_experts}x{c.moe.d_ff} top-{c.moe.top_k}",
            "sid_head": model.sid_head is not None,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def run_gpu_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the configs named in ``args.configs``; returns (and writes to args.out) the result dict.

    ``args`` may be bench/serving.py's namespace (``--target gpu``): its options (configs, users, history, k,
    out) mean other things there, so this bench then runs with its own defaults.
    """
    if getattr(args, "target", None) is not None:
        args = parse_args([])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/serving_gpu.py needs a CUDA GPU (the CPU path is benchmarked by bench/serving.py)")
    if args.smoke:
        args.items, args.history, args.users = min(args.items, 20_000), min(args.history, 128), min(args.users, 256)
        args.seconds, args.open_seconds, args.batches = min(args.seconds, 0.2), min(args.open_seconds, 0.3), "1,8,32"
        args.rates_ml1m = args.rates_industrial = "2000"
    configs = [c for c in args.configs.split(",") if c]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    conditions = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}  # this run's options
    result: dict[str, Any] = {"device": f"{gpu} (torch {torch.__version__})",
                              "rows": [], "open_loop": [], "stages": {}, "configs": {}}
    out_path = Path(args.out)
    if args.merge and out_path.exists():
        old = json.loads(out_path.read_text())
        keep = [c for c in old.get("configs", {}) if c not in configs]
        result["rows"] = [r for r in old.get("rows", []) if r["config"] in keep]
        result["open_loop"] = [r for r in old.get("open_loop", []) if r["config"] in keep]
        result["stages"] = {c: v for c, v in old.get("stages", {}).items() if c in keep}
        result["configs"] = {c: old["configs"][c] for c in keep}
    for name in configs:
        targets = None
        if name == "ml1m":
            ckpt = Path(args.checkpoint) if args.checkpoint else None
            if ckpt is None:
                if args.train_minutes <= 0:
                    raise SystemExit("ml1m needs --checkpoint or --train-minutes")
                ckpt = train_ml1m(args.train_minutes, args.train_out)
            pool = ml1m_pool(ckpt)
            model, rows, targets = pool["model"], pool["rows"], pool["targets"]
            info: dict[str, Any] = {"checkpoint": str(ckpt), **describe(model), "test": {
                k: pool["summary"].get("test", {}).get(k) for k in ("hr@10", "ndcg@10", "mrr")},
                "train_minutes": pool["summary"].get("train_minutes"), "mask_history": pool["mask"]}
            rates = [float(r) for r in args.rates_ml1m.split(",")]
        elif name == "industrial":
            model = industrial_model(args.items, args.history)
            rows = industrial_pool(args.users, args.history, args.items)
            info = {**describe(model), "weights": "random", "users_in_pool": len(rows)}
            rates = [float(r) for r in args.rates_industrial.split(",")]
        else:
            raise SystemExit(f"unknown config {name!r} (ml1m, industrial)")
        print(f"== {name}: {info}", flush=True)
        part = bench_config(name, model, rows, args, rates, targets)
        if "engine_quality" in part:
            info["serving_engine_test"] = part["engine_quality"]
        if "engine_quality_ranked" in part:
            info["serving_engine_test_ranked"] = part["engine_quality_ranked"]
        info["measured"] = {"date": utc_now(), "commit": git_commit()[0], "gpu": gpu}  # --merge keeps others'
        result["configs"][name] = info
        result["rows"] += part["rows"]
        result["open_loop"] += part["open_loop"]
        result["stages"][name] = part["stages"]
    print_table(result["rows"], COLUMNS)
    print_table(result["open_loop"], OPEN_COLUMNS)
    write_result(out_path, "serving_gpu", conditions, result)
    return result


def main(argv: list[str] | None = None) -> int:
    run_gpu_bench(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
