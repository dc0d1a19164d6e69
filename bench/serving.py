"""/recommend end to end over HTTP under open-loop load, on this box (CPU target) or the GPU generator (GPU target).

CPU target: starts a private redis-server (the stack's Redis is not touched), pushes N users' states through
Feast into it, then for each config starts `ugt serve` (uvicorn, one process; with engine: process, as
shipped, plus its forked engine process) and drives it at fixed rates with Poisson arrivals, after a warm-up
that asks for every user once (each row records the share of KV-cache hits it saw). Latency is measured from each request's SCHEDULED send time, so when the server (or
the client) falls behind, the queueing shows in the percentiles instead of silently lowering the load
(coordinated omission). The anchor, measured in the same run under the same load on the same box, is a
trivial FastAPI endpoint (constant answer) served the same way.

  python -m bench.serving                                  # CPU: anchor, popularity, ugt-tiny (+ eager, thread ablations)
  python -m bench.serving --rates 500,1000 --duration 5 --configs ugt-tiny
  python -m bench.serving --target gpu ...                 # bench.serving_gpu.run_gpu_bench(args)

Writes bench/results/serving_cpu.json (bench.common.write_result): the load's `conditions`, and `rows` of
{config, qps, p50_ms, p99_ms, p999_ms, ...} with the per-stage split from the responses' timings_ms. The load
generator is bench.http_load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from fastapi import Request  # module level: the anchor's handler annotations are resolved here
from fastapi.responses import Response
from tqdm import tqdm

from bench.common import print_table, result_path, write_result
from bench.http_load import STAGES, open_loop, paused_gc_open_loop, summarize
from bench.proc_cpu import cpu_seconds, tree_cpu_seconds

PROG = "python -m bench.serving"
REPO = Path(__file__).resolve().parent.parent
DOMAIN = "benchmovie"
TINY_CONFIG = "models/configs/ugt_ml100k_tiny.yaml"


# -- the anchor: a trivial FastAPI endpoint ----------------------------------------------------------------
def anchor_app():  # -> FastAPI
    """POST /recommend answering a constant list of 10 items: the cost of HTTP + FastAPI + JSON alone."""
    from fastapi import FastAPI

    app = FastAPI()
    answer = json.dumps(
        {"user_id": "", "items": [{"item_id": str(i), "score": 1.0} for i in range(10)], "fallback": False}
    ).encode()

    async def recommend(request: Request) -> Response:
        json.loads(await request.body())  # read and parse the body, as a real endpoint must
        return Response(content=answer, media_type="application/json")

    async def health() -> dict:
        return {"status": "ok"}

    app.add_api_route("/recommend", recommend, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    return app


def serve_anchor(port: int, workers: int) -> None:
    import uvicorn

    uvicorn.run("bench.serving:anchor_app", factory=True, workers=workers, host="127.0.0.1", port=port,
                log_level="warning", access_log=False)


# -- the stack of the benchmark: private Redis, states, a small checkpoint ---------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """A private redis-server on ``port`` (default: a free one), its data in ``workdir``; (process, port)."""
    import redis

    port = port or free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench.serving: redis-server did not start (is it installed? infra/install.sh)") from None
            time.sleep(0.05)


def ensure_checkpoint(cache_dir: Path) -> Path:
    """The small model: ugt_ml100k_tiny trained for one epoch (CPU, ~20 s), cached across runs."""
    out = cache_dir / "bench" / "ugt-ml100k-tiny"
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        return checkpoint
    from models.train import fit
    from models.train_config import load_config

    print(f"training the small model once into {out} ...", file=sys.stderr)
    cfg = load_config(
        str(REPO / TINY_CONFIG),
        {"out_dir": str(out), "progress": True, "device": "cpu", "max_epochs": 1},
    )
    fit(cfg)
    return checkpoint


def seed_states(settings: Any, checkpoint: Path, users: int, history: int, seed: int) -> tuple[list[str], list[str]]:
    """Push ``users`` states of ``history`` ML-100K items each through Feast; popularity for the domain.

    Returns (user ids, the model's item ids)."""
    import pandas as pd
    import redis
    import torch
    from feast.data_source import PushMode

    from contracts.tokenizer import TokenizedEvent
    from contracts.user_state_rule import states_from_events
    from infra.feast_store import open_feature_store

    vocab = list(torch.load(checkpoint, map_location="cpu", weights_only=False)["vocab"])
    rng = random.Random(seed)
    base = int(time.time() * 1000) - 86_400_000
    events = []
    ids = [f"bench-u{i}" for i in range(users)]
    for user in ids:
        for n, item in enumerate(rng.sample(vocab, history)):
            events.append(
                TokenizedEvent(event_id=f"{user}-{n}", user_id=user, item_id=str(item), event_time=base + n * 60_000,
                               domain=DOMAIN, action_token=2, rating_token=8, duration_token=0, hour_token=10)
            )
    frame = pd.DataFrame([s.to_feature_row() for s in states_from_events(events).values()])
    frame["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    open_feature_store(settings).push("user_recent_events_push", frame, to=PushMode.ONLINE)
    popular = {str(item): float(len(vocab) - i) for i, item in enumerate(vocab)}
    redis.Redis.from_url(settings.redis_url).zadd(f"ugt:popularity:{DOMAIN}", popular)
    return ids, [str(item) for item in vocab]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def is_anchor(self) -> bool:
        return self.name == "anchor-fastapi"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_healthy(server: Server, timeout_s: float = 300.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"bench.serving: {server.name} exited at start; see {server.log}")
        try:
            if requests.get(f"http://127.0.0.1:{server.port}/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench.serving: {server.name} not healthy in {timeout_s:.0f} s; see {server.log}")


def start_server(name: str, workdir: Path, env: dict[str, str], config: dict[str, Any] | None, workers: int) -> Server:
    """``ugt serve`` with ``config`` (YAML), or the anchor when config is None."""
    port = free_port()
    log = workdir / f"{name}.log"
    if config is None:
        cmd = [sys.executable, "-m", "bench.serving", "--serve-anchor", str(port), "--workers", str(workers)]
    else:
        path = workdir / f"{name}.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        cmd = [str(Path(sys.executable).parent / "ugt"), "serve", "--config", str(path), "--port", str(port),
               "--workers", str(workers)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, proc, port, log)
    wait_healthy(server)
    return server


def calibrate(checkpoint: Path, batches: int = 100, batch: int = 8) -> float:
    """ms per UGTGenerator.recommend_batch of ``batch`` cache-hit users, in this process on one thread (best of 5).

    The box is a shared VM whose speed drifts (this number moved between 1.7 and 3.8 ms within an hour here):
    measured before and after the load, it says how fast the machine was while the rows were taken.
    """
    import numpy as np
    import torch

    from contracts.user_state_rule import STATE_VERSION
    from serving.generator import GenerationRequest
    from serving.ugt_generator import UGTGenerator
    from serving.user_state_reader import UserStateView

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = UGTGenerator(checkpoint, kv_cache_users=batches * batch)
        rng = np.random.default_rng(0)
        vocab = list(gen.item_to_index)
        times = tuple(1_700_000_000_000 + i * 60_000 for i in range(50))
        requests = []
        for u in range(batches * batch):
            items = tuple(str(i) for i in rng.choice(vocab, 50))
            state = UserStateView(f"calibration-{u}", items, (2,) * 50, (8,) * 50, times, 50, times[-1], STATE_VERSION)
            requests.append(GenerationRequest(state, 10, frozenset(items), DOMAIN))
        groups = [requests[i : i + batch] for i in range(0, len(requests), batch)]
        for group in groups:  # fill the caches: the timed passes are the cache-hit path the bench mostly sees
            gen.recommend_batch(group)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for group in groups:
                gen.recommend_batch(group)
            best = min(best, (time.perf_counter() - start) / len(groups) * 1000.0)
        return round(best, 3)
    finally:
        torch.set_num_threads(threads)


def kv_cache_lookups(port: int) -> tuple[float, float]:
    """(hits, the other lookups: appends and misses) of the server's UGT prefix cache so far, from its /metrics
    (0, 0 without one)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {"hit": 0.0, "append": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "ugt_serving_kv_cache_lookups":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["result"]] += sample.value
    return counts["hit"], counts["append"] + counts["miss"]


def warm_up(server: Server, rates: list[float], args: argparse.Namespace, users: list[str]) -> None:
    """Every user once (users are asked round-robin), so the measured rates see the steady state of a service
    whose users were seen before (their prefix K/V cached) rather than its first minute."""
    warm_rate = max(min(rates), 500.0)
    asyncio.run(open_loop(server.port, warm_rate, len(users) / warm_rate + 0.5, users, args.k, args.connections,
                          args.seed))


def measure(server: Server, rate: float, args: argparse.Namespace, users: list[str], items: list[str],
            repeat: int = 0) -> dict:
    """One row: ``server`` under ``rate`` req/s for ``args.duration`` seconds (``repeat``: a fresh arrival draw)."""
    port = server.port
    cpu_before = tree_cpu_seconds(server.proc.pid)
    hits_before, misses_before = kv_cache_lookups(port) if not server.is_anchor else (0.0, 0.0)
    client = psutil.Process()
    client_cpu_before = cpu_seconds(client)
    samples, wall = paused_gc_open_loop(port, rate, args.duration, users, args.k, args.connections,
                                        args.seed + int(rate) + 7919 * repeat, args.fresh_share, items)
    row = summarize(server.name, rate, samples, wall)
    if args.samples_dir:  # every request of the row, to study where the tail comes from
        path = Path(args.samples_dir) / f"{server.name}-{int(rate)}-{repeat}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            for s in samples:
                out.write(json.dumps({"t": round(s.scheduled_s, 4), "ms": round(s.latency_ms, 3), "status": s.status,
                                      "batch": s.batch_size, "timings": s.timings}) + "\n")
    # the server's CPU per request: what the box's load does not change much (unlike the latencies)
    row["server_cpu_ms_per_req"] = round(1000.0 * (tree_cpu_seconds(server.proc.pid) - cpu_before) / len(samples), 3)
    # the load generator shares the two cores: what it burns is CPU the server does not get
    row["client_cpu_ms_per_req"] = round(1000.0 * (cpu_seconds(client) - client_cpu_before) / len(samples), 3)
    if not server.is_anchor:
        hits, misses = kv_cache_lookups(port)
        looked_up = (hits - hits_before) + (misses - misses_before)
        if looked_up:
            row["kv_cache_hit_ratio"] = round((hits - hits_before) / looked_up, 4)
    time.sleep(0.5)
    return row


def cpu_configs(checkpoint: Path, names: list[str]) -> dict[str, dict[str, Any] | None]:
    """The served configs. ugt-tiny / popularity run as the shipped serving config does (engine: process,
    torch_compile: true); the ablations: *-engine-thread runs the pipeline on a thread of the HTTP process,
    ugt-tiny-eager the model without torch.compile."""
    common = {"default_domain": DOMAIN, "log_level": "warning", "batch_max_size": 64, "batch_max_wait_ms": 1.0}
    ugt = common | {"generator": "ugt", "checkpoint": str(checkpoint)}
    popularity = common | {"generator": "popularity"}
    all_configs: dict[str, dict[str, Any] | None] = {
        "anchor-fastapi": None,
        "popularity": popularity | {"engine": "process"},
        "ugt-tiny": ugt | {"engine": "process", "torch_compile": True},
        "popularity-engine-thread": popularity | {"engine": "thread"},
        "ugt-tiny-engine-thread": ugt | {"engine": "thread", "torch_compile": True},
        "ugt-tiny-eager": ugt | {"engine": "process", "torch_compile": False},
        # batching ablations: a longer wait makes batches larger, so less CPU per request, at some latency
        **{f"ugt-tiny-wait{ms}ms": ugt | {"engine": "process", "torch_compile": True, "batch_max_wait_ms": float(ms)}
           for ms in (2, 3, 5)},
    }
    unknown = [n for n in names if n not in all_configs]
    if unknown:
        raise SystemExit(f"bench.serving: unknown --configs {unknown}; known: {list(all_configs)}")
    return {n: all_configs[n] for n in names}


def measure_configs(args: argparse.Namespace, rates: list[float], checkpoint: Path,
                    configs: dict[str, dict[str, Any] | None]) -> list[dict]:
    """Start a private Redis and every server, warm them, then measure each config at each rate (interleaved)."""
    from infra.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="ugt-bench-serving-"))
    redis_proc, redis_port = start_redis(workdir)
    env = os.environ | {"UGT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "PYTHONPATH": str(REPO)}
    servers: list[Server] = []
    rows: list[dict] = []
    try:
        os.environ["UGT_REDIS_URL"] = env["UGT_REDIS_URL"]
        users, items = seed_states(Settings(), checkpoint, args.users, args.history, args.seed)
        for name, config in configs.items():  # all up at once, idle while another is measured
            servers.append(start_server(name, workdir, env, config, args.workers))
        for server in servers:
            warm_up(server, rates, args, users)
        # configs interleaved within each rate: the shared VM's speed drifts over minutes (see machine_speed),
        # and one config measured entirely in a slow spell would look worse than it is
        for rate in tqdm(rates, desc="rates", unit="rate", file=sys.stderr):
            for repeat in range(args.repeats):
                for server in servers:
                    row = measure(server, rate, args, users, items, repeat)
                    rows.append(row | {"repeat": repeat} if args.repeats > 1 else row)
    finally:
        for server in servers:
            server.stop()
        redis_proc.terminate()
        redis_proc.wait(timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)
    names = list(configs)
    rows.sort(key=lambda row: (names.index(row["config"]), row["qps"], row.get("repeat", 0)))
    return rows


def print_rows(rows: list[dict], repeats: int) -> None:
    """The rows, then the per-stage split of the rows whose server reported its timings."""
    columns = ["config", "qps", *(["repeat"] if repeats > 1 else []), "achieved_qps", "p50_ms", "p99_ms",
               "p999_ms", "non_200", "fallbacks", "mean_batch", "kv_cache_hit_ratio", "server_cpu_ms_per_req",
               "client_cpu_ms_per_req"]
    print_table(rows, columns)
    stage_rows = [
        {"config": r["config"], "qps": r["qps"], **{f"{s}_p50": r["stages_ms"][s]["p50"] for s in STAGES},
         **{f"{s}_p99": r["stages_ms"][s]["p99"] for s in ("queue", "generate", "total")}, "http_p50": r["http_p50_ms"]}
        for r in rows if "stages_ms" in r
    ]
    print_table(stage_rows)


def run_cpu(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from infra.settings import get_settings

    rates = [float(r) for r in args.rates.split(",")]
    if not 0.0 <= args.fresh_share <= 1.0:
        raise SystemExit(f"bench.serving: --fresh-share must be in [0, 1], got {args.fresh_share}")
    if args.repeats < 1:
        raise SystemExit(f"bench.serving: --repeats must be >= 1, got {args.repeats}")
    load_start = os.getloadavg()[0]  # the box is shared: a busy box shows here
    names = ["anchor-fastapi", *[n for n in args.configs.split(",") if n and n != "anchor-fastapi"]]
    checkpoint = ensure_checkpoint(get_settings().cache_dir)
    configs = cpu_configs(checkpoint, names)
    speed_start = calibrate(checkpoint)
    rows = measure_configs(args, rates, checkpoint, configs)
    print_rows(rows, args.repeats)
    target_rows = [r for r in rows if r["config"] == "ugt-tiny" and r["qps"] == 1000.0]
    windows_met = sum(r["p99_ms"] <= 20.0 and r["non_200"] == 0 for r in target_rows)
    conditions = {
        "load": {"arrivals": "poisson, open loop; latency from the scheduled send time", "duration_s": args.duration,
                 "connections": args.connections, "server_workers": args.workers, "k": args.k, "users": args.users,
                 "history": args.history, "fresh_share": args.fresh_share,
                 "order": "all servers up and warmed (every user once) first; then per rate, each config in turn",
                 "client": "asyncio keep-alive HTTP/1.1 client in the bench process, same box"},
        "anchor": "anchor-fastapi: a trivial FastAPI endpoint (constant answer), uvicorn, same box, same load",
        "target": "ugt-tiny: P99 <= 20 ms at 1,000 req/s end to end",
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "machine_speed": {"what": "ms per model batch of 8 cache-hit users, one thread, in the bench process "
                                  "(bench.serving.calibrate); lower = faster box", "start": speed_start,
                          "end": calibrate(checkpoint)},
    }
    results = {
        "target_met": bool(target_rows) and windows_met == len(target_rows),  # in every window measured
        "target_windows_met": f"{windows_met} of {len(target_rows)}",
        "rows": rows,
    }
    write_result(args.out, "serving_cpu", conditions, results, argv, PROG)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu", help="cpu: end to end here; gpu: bench.serving_gpu")
    parser.add_argument("--rates", default="250,500,1000,2000", help="req/s to offer, comma-separated (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per rate (default: %(default)s)")
    parser.add_argument("--configs", default="popularity,ugt-tiny,ugt-tiny-eager,ugt-tiny-engine-thread",
                        help="served configs besides the anchor: popularity, ugt-tiny (as shipped: engine process, "
                             "torch_compile), ugt-tiny-eager (no torch.compile), popularity-engine-thread, "
                             "ugt-tiny-engine-thread, ugt-tiny-wait2ms, ugt-tiny-wait3ms, ugt-tiny-wait5ms (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=128, help="client keep-alive connections (default: %(default)s)")
    parser.add_argument("--users", type=int, default=2000, help="users with state (default: %(default)s)")
    parser.add_argument("--history", type=int, default=50, help="events per user state (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="items per request (default: %(default)s)")
    parser.add_argument("--fresh-share", type=float, default=0.1,
                        help="share of requests with a new session item, so the model reruns that user's whole "
                             "sequence (a KV-cache miss) as after a new event (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="offer each rate this many times per config, configs interleaved, to see how much the "
                             "box's spells move the tail (rows get a 'repeat' field; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--samples-dir", default="", help="also write every request (send time, latency, server "
                                                          "stage timings) as CONFIG-RATE-REPEAT.jsonl here")
    parser.add_argument("--out", default=str(result_path("serving_cpu")), help="result JSON (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes of every server, the anchor's too (default: %(default)s)")
    parser.add_argument("--serve-anchor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_anchor:
        serve_anchor(args.serve_anchor, args.workers)
        return 0
    if args.target == "gpu":
        from bench.serving_gpu import run_gpu_bench  # the generator alone, batched, on a GPU

        run_gpu_bench(args)  # writes bench/results/serving_gpu.json; its own options: bench/serving_gpu.py --help
        return 0
    return run_cpu(args, argv)


if __name__ == "__main__":
    sys.exit(main())
