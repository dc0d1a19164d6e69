"""`ugt serve` on a GPU host end to end: HTTP workers + the GPU engine + Redis, under open-loop traffic with a
KV-cache mix, beside its anchors, in one run on one host.

What runs (all on this host): a private redis-server; the users' states written into it in Feast's layout; `ugt serve
--workers W` (W HTTP workers, one engine process owning the model on the GPU: serving/engine_spawn.py), first with
``engine_scope: model`` (``ugt-serve-model``: the workers run the pipeline, the engine only the model), then with the
engine running every request's whole pipeline (``ugt-serve``, engine_scope: pipeline); P load
processes and a few state-writer processes (bench/e2e_load.py). Per offered rate: 70% of requests from seen users
with a new event since their last request (written to Redis just before: a KV append), 20% seen users with no new
event (a hit), 10% users never requested (a miss) (--mix); users drawn Zipf-like. Rows record the latency from each
request's scheduled time (p50/p99/p99.9), errors, fallbacks, the server's own KV-cache counters for the rate, the
front end's CPU per request (the HTTP workers' CPU seconds / requests), the engine's CPU and model time per batch,
and the load processes' CPU.

Anchors in the same run: (a) ``anchor-http``: a trivial FastAPI endpoint (constant answer) with the same W
workers: the HTTP ceiling of this host; ``anchor-asgi``: the same answer from a bare ASGI callable on uvicorn, the
shape of serving's own lane for /recommend (serving/recommend_lane.py), so the floor /recommend actually sits on; (b) ``single-process``: `ugt serve --workers 1`, the service before the
shared engine (one process, the engine a thread beside the event loop), at the same rates until it saturates;
(c) ``generator-alone``: the served model in the bench process with the same mix, no HTTP, IPC or Redis, each
request's row built in the timed loop one batch at a time: the single-process pipeline (bench/e2e_generator.py);
``generator-engine``: the model-scope engine alone (serving/engine_model.py's ModelCore), every request's packed
frame built before the timed loop (untimed: the workers build rows in parallel), two steps in flight
(bench/e2e_engine.py).

The model: ``ml1m``, the trained ML-1M UGT (--checkpoint; the users are ML-1M's 6,040 replayed from the dataset:
each state holds the user's first events, leaving room for --append-room new ones, which are the user's next real
events; --clones copies of each user, with their own ids, make the user population larger than the KV cache's
hot set). ``industrial`` (--size industrial): a random-weight UGT of 8 layers, d = 256, history 1,024 and 1M
items (--layers, --dim, --history, --items), written as a checkpoint into the run's folder (bench/e2e_industrial.py)
so `ugt serve` and every anchor load it unchanged; --users synthetic users (default 1M) whose states start with
--first-events events (default history - append room) drawn Zipf-like over the items (bench/e2e_users.py
``synthetic_users``). Writing the first states costs about 1 ms of CPU and 23 KiB of Redis memory per user at the
default sizes (960 events each; measured on a 2-core CPU box): 1M users ~23 GiB of Redis and ~1,000 CPU-seconds,
spread over --state-writers processes; fewer users or shorter first states cost proportionally less.

  python bench/serving_gpu_e2e.py --checkpoint ckpt.pt --out $OUT/serving_gpu_e2e.json     # on the GPU host
  python bench/serving_gpu_e2e.py --smoke --checkpoint ckpt.pt --device cpu --out /tmp/e2e.json   # CPU dry run
  python bench/serving_gpu_e2e.py --size industrial --smoke --device cpu --out /tmp/e2e.json    # industrial, CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from the repo root

from bench.common import print_table, write_result  # noqa: E402
from bench.e2e_industrial import item_name, resolve_size, write_industrial_checkpoint  # noqa: E402
from bench.e2e_load import APPEND, CLASS_NAMES, make_schedule, run_load, run_writer, share  # noqa: E402
from bench.e2e_users import Users, ml1m_users, synthetic_users  # noqa: E402
from bench.http_load import pct  # noqa: E402
from bench.serving import free_port, start_redis  # noqa: E402
from serving.http_models import MAX_K  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ("config", "offered_qps", "served_qps", "p50_ms", "p99_ms", "p999_ms", "errors", "fallbacks",
           "cache_hit", "cache_append", "cache_miss", "frontend_cpu_ms_per_req", "engine_ms_per_batch", "mean_batch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/serving_gpu_e2e.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="ml1m", choices=("ml1m", "industrial"),
                   help="ml1m: the trained ML-1M UGT (--checkpoint) and ML-1M's users; industrial: a random-weight "
                        "UGT of --layers/--dim/--history/--items and --users synthetic users (default: %(default)s)")
    p.add_argument("--checkpoint", default="", help="the trained ML-1M UGT checkpoint.pt (`ugt train`); --size ml1m")
    p.add_argument("--items", type=int, help="industrial: catalog size (default 1,000,000; smoke 5,000)")
    p.add_argument("--layers", type=int, help="industrial: layers (default 8; smoke 2)")
    p.add_argument("--dim", type=int, help="industrial: model width d, heads of 64 (default 256; smoke 64)")
    p.add_argument("--history", type=int, help="industrial: history / state window in events (default 1,024; smoke 64)")
    p.add_argument("--users", type=int,
                   help="industrial: synthetic users (default 1,000,000: ~23 GiB of Redis and ~1,000 CPU-s to write "
                        "at 960 first events each, ~1 ms and 23 KiB per user on a CPU box; smoke 2,000)")
    p.add_argument("--first-events", type=int,
                   help="industrial: events in each user's first state (default --history - --append-room); the "
                        "write cost per user scales with it")
    p.add_argument("--zipf", type=float, default=1.0, help="industrial: item popularity exponent of the histories")
    p.add_argument("--state-writers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                   help="processes writing the first states into Redis (default: %(default)s)")
    p.add_argument("--out", default="bench/results/serving_gpu_e2e.json", help="result file (default: %(default)s)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the engine runs the model")
    p.add_argument("--workers", type=int, default=8, help="HTTP worker processes of `ugt serve` and the anchor")
    p.add_argument("--load-processes", type=int, default=5, help="HTTP load-generator processes")
    p.add_argument("--writers", type=int, default=2, help="state-writer processes (the stream of new events)")
    p.add_argument("--rates", default="5000,10000,20000,30000,40000,50000", help="offered req/s, comma list")
    p.add_argument("--single-rates", default="2000,5000,10000,20000", help="rates of the --workers 1 anchor")
    p.add_argument("--generator-rates", default="10000,20000,50000,100000",
                   help="rates of the generator-alone and generator-engine anchors (c)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per rate")
    p.add_argument("--mix", default="0.1,0.2,0.7", help="miss,hit,append shares (default: %(default)s)")
    p.add_argument("--clones", type=int, default=20, help="copies of each ML-1M user (distinct ids)")
    p.add_argument("--warm-users", type=int, default=60_000, help="users requested once before the rates (seen)")
    p.add_argument("--warm-rate", type=float, help="req/s of the warm-up (all misses; default 10,000, industrial "
                                                   "3,000, smoke 2,000)")
    p.add_argument("--append-room", type=int, default=64, help="events of room left in each state for appends")
    p.add_argument("--lead-ms", type=float, default=20.0, help="a new event is written this long before its request")
    p.add_argument("--kv-cache-bytes", type=int, default=48 << 30, help="the engine's KV pool (bytes)")
    p.add_argument("--history-hop", type=int, default=0,
                   help="the serving key history_hop: the window's start moves in steps of this many events, so "
                        "users past a full window still append to their KV prefix (0 = slide per event)")
    p.add_argument("--rank-top", type=int, default=-1,
                   help="the serving key rank_top (-1: the checkpoint's own; the industrial checkpoint has a ranking "
                        "head, so its top 100 are reordered unless 0)")
    p.add_argument("--compare-hop", type=int, default=-1,
                   help=">= 0: ugt-serve-model also runs with this history_hop, before the --history-hop group "
                        "(the same rates; its rows are ugt-serve-model-hopN)")
    p.add_argument("--paged-attention", action="store_true",
                   help="the serving key paged_attention: the engine's cached steps read the KV pool in place")
    p.add_argument("--kv-admission", choices=["lru", "second_sight"], default="lru",
                   help="the KV pool's admission rule (serving key kv_cache_admission)")
    p.add_argument("--batch-max", type=int, default=128, help="serving batch_max_size")
    p.add_argument("--engine-max-rows", type=int, default=128,
                   help="serving engine_max_rows: rows per model step across workers (CUDA graph buckets up to it)")
    p.add_argument("--engine-frames", default="workers", choices=("workers", "request"),
                   help="generator-engine: frames as the --workers workers' batchers send them (1 ms wait, up to "
                        "--batch-max rows), or one frame per request")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-connections", type=int, default=256, help="per load process")
    p.add_argument("--skip", default="",
                   help="comma list of row groups to skip: ugt-serve-model, ugt-serve, single-process, anchor-http, "
                        "anchor-asgi, generator-alone, generator-engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redis-port", type=int, default=0, help="the private redis-server's port (default: a free one)")
    p.add_argument("--http-port", type=int, default=0,
                   help="the servers take ports from this one up, one each (default: free ones)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and rates (a dry run of the whole path)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rates, args.single_rates, args.generator_rates, args.duration = "200,400", "200", "400", 2.0
        args.clones, args.warm_users, args.workers, args.load_processes, args.writers = 1, 500, 2, 1, 1
        args.kv_cache_bytes = 256 << 20
    resolve_size(args)
    if args.size == "ml1m" and not args.checkpoint:
        p.error("--size ml1m needs --checkpoint (a trained ML-1M UGT)")
    if args.warm_rate is None:
        args.warm_rate = 2000.0 if args.smoke else 3000.0 if args.size == "industrial" else 10_000.0
    return args


# -- the servers ---------------------------------------------------------------------------------------------
HTTP_PORTS: list[int] = []  # --http-port's range, taken in turn by the servers started; empty: free ports


def server_port() -> int:
    return HTTP_PORTS.pop(0) if HTTP_PORTS else free_port()


class Server:
    """`ugt serve` (or the anchor) in its own process group, with its log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path, port: int):
        self.name, self.port = name, port
        self.log = workdir / f"{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def serve_ugt(name: str, workdir: Path, env: dict[str, str], config: dict[str, Any], workers: int) -> Server:
    port = server_port()
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    cmd = [sys.executable, "-m", "ugt", "serve", "--config", str(path), "--port", str(port), "--workers", str(workers)]
    return Server(name, cmd, env, workdir, port)


def serve_anchor(workdir: Path, env: dict[str, str], workers: int, name: str = "anchor-http") -> Server:
    """A constant answer on ``workers`` uvicorn workers: ``anchor-http`` a FastAPI route (bench/serving.py),
    ``anchor-asgi`` a bare ASGI callable, the shape of serving's own lane for /recommend (bench/http_floor.py)."""
    port = server_port()
    if name == "anchor-asgi":
        cmd = [sys.executable, "-m", "bench.http_floor", "--serve", "uvicorn-asgi", "--port", str(port),
               "--workers", str(workers)]
    else:
        cmd = [sys.executable, "-m", "bench.serving", "--serve-anchor", str(port), "--workers", str(workers)]
    return Server(name, cmd, env, workdir, port)


def wait_served(server: Server, user: str, model: bool, timeout_s: float = 600.0) -> None:
    """Until the server answers ``user`` (from the model, not a fallback, when ``model``)."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} exited ({server.proc.returncode}):\n{server.tail()}")
        try:
            r = requests.post(f"http://127.0.0.1:{server.port}/recommend", json={"user_id": user, "k": 10}, timeout=5)
            if r.status_code == 200 and (not model or not r.json().get("fallback")):
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name} did not serve within {timeout_s:.0f} s:\n{server.tail()}")
        time.sleep(0.5)


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    try:
        answer = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
    except requests.RequestException:
        return {}
    if answer.status_code != 200:  # the anchor has no /metrics
        return {}
    text = answer.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def server_cpu(server: Server) -> tuple[float, float]:
    """(HTTP side, engine) CPU seconds so far: the spawned engine is the child running serving.engine_spawn; with
    one process (no spawned engine) everything counts as HTTP side."""
    import psutil

    http = engine = 0.0
    root = psutil.Process(server.proc.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            spent = times.user + times.system
            if "serving.engine_spawn" in " ".join(proc.cmdline()):
                engine += spent
            else:
                http += spent
        except psutil.NoSuchProcess:
            continue
    return http, engine


# -- one rate ------------------------------------------------------------------------------------------------
def drive(server: Server, users: Users, rate: float, args: argparse.Namespace, redis_port: int, seed: int,
          mix: tuple[float, float, float] | None = None, popular_last: bool = False) -> dict[str, Any]:
    """Send one schedule at ``rate`` (writers stream the appends' new events first); the row of results."""
    schedule = make_schedule(rate, args.duration, mix or args.mix_shares, users.seen, len(users.ids), seed,
                             popular_last)
    before, cpu_before = scrape(server), server_cpu(server)
    start_at = time.time() + 1.5
    P, W = args.load_processes, max(1, args.writers)
    share(schedule=schedule, users=users)  # the forked processes read these; a user's events go to one writer
    with multiprocessing.get_context("fork").Pool(P + W) as pool:
        loads = [pool.apply_async(run_load, (server.port, start_at, p, P, args.k, args.max_connections))
                 for p in range(P)]
        writers = [pool.apply_async(run_writer, (redis_port, start_at, w, W, args.lead_ms / 1000.0))
                   for w in range(W)]
        parts = [job.get() for job in loads]
        written = [job.get() for job in writers]
    wall = args.duration
    users.seen = schedule.seen_after
    np.add.at(users.shown, schedule.users[schedule.classes == APPEND], 1)  # what the writers appended
    after, cpu_after = scrape(server), server_cpu(server)
    latency = np.concatenate([part["latency_ms"] for part in parts])
    status = np.concatenate([part["status"] for part in parts])
    fell_back = np.concatenate([part["fallback"] for part in parts])
    n = len(latency)
    ok = status == 200
    done_by = float(schedule.times[-1]) + float(np.max(latency)) / 1000.0 if n else wall
    row: dict[str, Any] = {
        "config": server.name, "offered_qps": rate, "requests": n,
        "served_qps": round(float(ok.sum()) / max(done_by, wall), 1),
        "p50_ms": round(pct(latency.tolist(), 50), 2), "p99_ms": round(pct(latency.tolist(), 99), 2),
        "p999_ms": round(pct(latency.tolist(), 99.9), 2),
        "errors": int((~ok).sum()), "fallbacks": int(fell_back[ok].sum()),
        "planned_mix": {name: int((schedule.classes == c).sum()) for c, name in enumerate(CLASS_NAMES)},
        "load_cpu_s": round(sum(part["cpu_s"] for part in parts), 2),
        "writer_cpu_s": round(sum(w["cpu_s"] for w in written), 2),
        "writes_late": int(sum(w["late"] for w in written)),
    }
    for result in ("hit", "append", "miss"):
        got = metric(after, "ugt_serving_kv_cache_lookups_total", result=result) - metric(
            before, "ugt_serving_kv_cache_lookups_total", result=result)
        row[f"cache_{result}"] = int(got)
    http_cpu = cpu_after[0] - cpu_before[0]
    engine_cpu = cpu_after[1] - cpu_before[1]
    row["frontend_cpu_ms_per_req"] = round(1000.0 * http_cpu / max(n, 1), 3)
    row["engine_cpu_ms_per_req"] = round(1000.0 * engine_cpu / max(n, 1), 3)
    batches = metric(after, "ugt_serving_batch_size_count") - metric(before, "ugt_serving_batch_size_count")
    batched = metric(after, "ugt_serving_batch_size_sum") - metric(before, "ugt_serving_batch_size_sum")
    gen_sum = metric(after, "ugt_serving_stage_seconds_sum", stage="generate") - metric(
        before, "ugt_serving_stage_seconds_sum", stage="generate")
    gen_count = metric(after, "ugt_serving_stage_seconds_count", stage="generate") - metric(
        before, "ugt_serving_stage_seconds_count", stage="generate")
    if batches:
        row["mean_batch"] = round(batched / batches, 1)
    if gen_count:  # each request observes its batch's model time: the request-weighted mean batch time
        row["engine_ms_per_batch"] = round(1000.0 * gen_sum / gen_count, 3)
    for stage in ("queue", "state", "total"):
        s = metric(after, "ugt_serving_stage_seconds_sum", stage=stage) - metric(
            before, "ugt_serving_stage_seconds_sum", stage=stage)
        c = metric(after, "ugt_serving_stage_seconds_count", stage=stage) - metric(
            before, "ugt_serving_stage_seconds_count", stage=stage)
        if c:
            row[f"{stage}_ms_mean"] = round(1000.0 * s / c, 3)
    return row


def warm(server: Server, users: Users, args: argparse.Namespace, redis_port: int) -> dict[str, Any]:
    """Ask every user of the seen pool once (all misses, the most popular last), at a rate the service sustains."""
    target = min(args.warm_users, len(users.ids))
    saved = args.duration
    rate = args.warm_rate
    args.duration = max(1.0, (target - users.seen) / rate)
    try:
        return drive(server, users, rate, args, redis_port, seed=999, mix=(1.0, 0.0, 0.0), popular_last=True)
    finally:
        args.duration = saved


# -- the run -------------------------------------------------------------------------------------------------
def ugt_config(args: argparse.Namespace, users: Users) -> dict[str, Any]:
    return {"generator": "ugt", "checkpoint": str(Path(args.checkpoint).resolve()), "default_domain": "movie",
            "state_reader": "redis", "device": args.device, "kv_cache_users": len(users.ids),
            "kv_cache_bytes": args.kv_cache_bytes, "batch_max_size": args.batch_max, "batch_max_wait_ms": 1.0,
            "engine_max_rows": args.engine_max_rows,
            "engine_queue_max": 16384, "live_items": 0, "log_level": "warning", "request_timeout_ms": 2000.0,
            "queue_timeout_ms": 1000.0, "max_history": users.window,
            "popularity_cache_size": max(2500, MAX_K + 1000 + users.window),  # >= k + max_exclude + history
            # only when asked: a baseline tree (bench/worker_cpu.py) may not know the key
            **({"kv_cache_admission": args.kv_admission} if getattr(args, "kv_admission", "lru") != "lru" else {}),
            **({"history_hop": args.history_hop} if getattr(args, "history_hop", 0) else {}),
            **({"rank_top": args.rank_top} if getattr(args, "rank_top", -1) >= 0 else {}),
            **({"paged_attention": True} if getattr(args, "paged_attention", False) else {})}


def run_rates(server: Server, users: Users, rates: list[float], args: argparse.Namespace, redis_port: int,
              rows: list[dict[str, Any]], mix: tuple[float, float, float] | None = None) -> None:
    for i, rate in enumerate(rates):
        row = drive(server, users, rate, args, redis_port, seed=args.seed + i, mix=mix)
        rows.append(row)
        print_table([row], COLUMNS)
        if row["p99_ms"] > 1000 or row["errors"] > 0.05 * row["requests"]:
            print(f"{server.name}: saturated at {rate:g} req/s; higher rates skipped", flush=True)
            break


def run(args: argparse.Namespace, save: Any = None) -> dict[str, Any]:
    """Every row group in turn; ``save(result)`` after each (a run cut short by a time limit keeps its rows)."""
    import redis

    args.mix_shares = tuple(float(x) for x in args.mix.split(","))
    rates = [float(r) for r in args.rates.split(",") if r]
    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(tempfile.mkdtemp(prefix="ugt-e2e-"))
    redis_proc, redis_port = start_redis(workdir, args.redis_port or None)
    HTTP_PORTS[:] = range(args.http_port, args.http_port + 20) if args.http_port else []
    env = os.environ | {"UGT_REDIS_PORT": str(redis_port), "UGT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    rows: list[dict[str, Any]] = []
    users = make_users(args, workdir)

    def ugt_group(name: str, workers: int, group_rates: list[float], scope: str = "pipeline",
                  hop: int | None = None) -> None:
        config = ugt_config(args, users) | {"engine_scope": scope} | ({} if hop is None else {"history_hop": hop})
        server = serve_ugt(name, workdir, env, config, workers)
        try:
            wait_served(server, users.ids[0], model=True)
            print(f"== {name}: warm-up", flush=True)
            warm(server, users, args, redis_port)
            run_rates(server, users, group_rates, args, redis_port, rows)
        finally:
            server.stop()

    def anchor_group(name: str = "anchor-http") -> None:
        anchor = serve_anchor(workdir, env, args.workers, name)
        try:
            wait_served(anchor, users.ids[0], model=False)
            warm(anchor, users, args, redis_port)  # every worker up and every connection opened once
            run_rates(anchor, users, rates, args, redis_port, rows, mix=(0.1, 0.9, 0.0))  # it reads no state
        finally:
            anchor.stop()

    def generator_group() -> None:
        from bench.e2e_generator import generator_rows

        print("== generator-alone", flush=True)
        rows.extend(generator_rows(args.checkpoint, users, [float(r) for r in args.generator_rates.split(",")], args))

    def engine_group() -> None:
        from bench.e2e_engine import engine_rows

        print("== generator-engine (rows packed untimed before each rate)", flush=True)
        rows.extend(engine_rows(args.checkpoint, users, [float(r) for r in args.generator_rates.split(",")], args))

    # the generator-alone and generator-engine groups hold the GPU in this process until the end: they run last
    groups = {} if args.compare_hop < 0 else {  # the comparison first: later groups meet fuller windows
        f"ugt-serve-model-hop{args.compare_hop}": lambda: ugt_group(f"ugt-serve-model-hop{args.compare_hop}",
                                                                    args.workers, rates, "model", args.compare_hop)}
    groups |= {"ugt-serve-model": lambda: ugt_group("ugt-serve-model", args.workers, rates, scope="model"),
              "ugt-serve": lambda: ugt_group("ugt-serve", args.workers, rates), "anchor-http": anchor_group,
              "anchor-asgi": lambda: anchor_group("anchor-asgi"),
              "single-process": lambda: ugt_group("single-process", 1,
                                                  [float(r) for r in args.single_rates.split(",")]),
              "generator-alone": generator_group, "generator-engine": engine_group}
    try:
        began = time.perf_counter()
        users.write_initial(redis.Redis(port=redis_port), processes=args.state_writers)
        print(f"{len(users.ids)} user states written in {time.perf_counter() - began:.1f} s", flush=True)
        for name, group in groups.items():  # in order of what matters most, should a time limit cut the run
            if name in skip:
                continue
            users.reset()
            group()
            for row in rows:
                row["size"] = args.size
            if save:
                save({"device": device_name(args.device), "users": users.describe(), "rows": rows, "complete": False})
    finally:
        redis_proc.terminate()
        redis_proc.wait()
    return {"device": device_name(args.device), "users": users.describe(), "rows": rows, "complete": True}


def make_users(args: argparse.Namespace, workdir: Path) -> Users:
    """The size's users; for industrial, its random-weight checkpoint written into ``workdir`` first (--checkpoint
    then names it, for the groups that load it)."""
    if args.size == "ml1m":
        return ml1m_users(Path(args.checkpoint), args.clones, args.append_room, args.seed)
    args.checkpoint = str(write_industrial_checkpoint(workdir / "industrial" / "checkpoint.pt", args.items,
                                                      args.layers, args.dim, args.history, args.seed))
    names = np.asarray([item_name(i) for i in range(args.items)], dtype=object)
    return synthetic_users(args.users, names, args.history, args.first_events, args.append_room, args.seed, args.zipf)


def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}), {os.cpu_count()} CPU cores"
    return f"cpu only ({os.cpu_count()} cores, torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = {k: v for k, v in vars(args).items() if k not in ("out", "mix_shares") and v is not None}
    conditions["size"] = args.size
    conditions["model"] = (
        {"weights": "random (bench/e2e_industrial.py)", "layers": args.layers, "d_model": args.dim,
         "history": args.history, "items": args.items, "users": args.users, "first_events": args.first_events,
         "zipf": args.zipf}
        if args.size == "industrial" else "the trained ML-1M UGT (--checkpoint)")
    conditions["latency"] = "from each request's scheduled send time (open loop, Poisson arrivals)"
    conditions["generator_engine"] = ("every request's row built and packed into the workers' frames BEFORE the timed "
                                      "loop (untimed: the workers do it in parallel); timed: the model-scope engine "
                                      "(ModelCore) on those frames, two steps in flight (bench/e2e_engine.py)")
    result = run(args, save=lambda partial: write_result(Path(args.out), "serving_gpu_e2e", conditions, partial))
    print_table(result["rows"], COLUMNS)
    write_result(Path(args.out), "serving_gpu_e2e", conditions, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
