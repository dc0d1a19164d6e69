"""The HTTP worker's CPU per request of `ugt serve --workers N` (engine_scope: model), two source trees side by side.

What the GPU host's end-to-end bench (bench/serving_gpu_e2e.py) found limits the service is the HTTP workers' CPU per
request (parse, guard, state read and decode, rows, rerank, JSON, metrics); the engine's model time is the GPU's.
This bench measures that one number on any machine, for a baseline tree (a git revision, extracted with `git
archive`) and the working tree, in one run: both servers run at once on the same Redis (the same users' states,
the same stream of new events), and each offered rate is sent to one and then the other, alternating, so a slow
spell of the machine hits both. The engine is spawned (`engine_start: spawn`) so its process is told apart; the
worker CPU counts only the HTTP worker processes (not the supervisor, not the engine, not the load generator).

Traffic is bench/e2e_load.py's: open-loop Poisson arrivals; a miss / hit / append mix (--mix); seen users drawn
Zipf-like; appends' new events written to Redis just before their request. Users: the ML-1M users of the
checkpoint (bench/e2e_users.py, --clones copies). Latency here is only a sanity check (the machine runs the
engine's model on its CPU too): read the CPU columns.

  python -m bench.worker_cpu --baseline 7c13f7e --rates 200,400 --duration 10 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO, print_table, result_path, write_result
from bench.e2e_users import ml1m_users
from bench.serving import free_port, start_redis
from bench.serving_gpu_e2e import Server, drive, ugt_config, wait_served

DEFAULT_CHECKPOINT = Path.home() / ".cache/ugt/quality-ml1m-resume/ugt-stable-s42/last.pt"
COLUMNS = ("config", "offered_qps", "served_qps", "p50_ms", "p99_ms", "fallbacks", "errors", "mean_batch",
           "worker_cpu_ms_per_req", "engine_cpu_ms_per_req", "cache_hit", "cache_append", "cache_miss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.worker_cpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="ML-1M UGT checkpoint (default: %(default)s)")
    p.add_argument("--baseline", default="HEAD", help="git revision of the baseline tree (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="HTTP workers of each server")
    p.add_argument("--rates", default="200,400", help="offered req/s, comma list")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the rates (each server once per rate)")
    p.add_argument("--mix", default="0.1,0.2,0.7", help="miss,hit,append shares (default: %(default)s)")
    p.add_argument("--clones", type=int, default=1, help="copies of each ML-1M user")
    p.add_argument("--warm-users", type=int, default=1000, help="users requested once before the rates")
    p.add_argument("--warm-rate", type=float, default=100.0, help="req/s of the warm-up (all misses)")
    p.add_argument("--append-room", type=int, default=64)
    p.add_argument("--lead-ms", type=float, default=20.0)
    p.add_argument("--batch-max", type=int, default=128)
    p.add_argument("--batch-wait-ms", type=float, default=1.0, help="batch_max_wait_ms of both servers")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--load-processes", type=int, default=1)
    p.add_argument("--writers", type=int, default=1)
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--probe-passes", type=int, default=4, help="interleaved in-process probe runs per tree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port-base", type=int, default=None,
                   help="the baseline server listens on this port, the current one on the next (default: free ports)")
    p.add_argument("--redis-port", type=int, default=None, help="the private Redis's port (default: a free one)")
    p.add_argument("--out", default=str(result_path("worker_cpu")), help="result file (default: %(default)s)")
    args = p.parse_args(argv)
    args.mix_shares = tuple(float(x) for x in args.mix.split(","))
    args.device, args.kv_cache_bytes = "cpu", 1 << 30
    args.engine_max_rows = args.batch_max  # serving_gpu_e2e.ugt_config's key: one model step per worker batch
    args.smoke = False
    return args


def extract(revision: str, into: Path) -> tuple[Path, str]:
    """The tree of ``revision`` in ``into`` (git archive: no worktree, no checkout), and its full commit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", revision], check=True, capture_output=True,
                            text=True).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    archive.wait()
    return into, commit


def serve(name: str, tree: Path, workdir: Path, env: dict[str, str], config: dict[str, Any], workers: int,
          port: int | None = None) -> Server:
    """`python -m ugt serve` run from ``tree`` (its own code: cwd and PYTHONPATH are the tree) on ``port``
    (default: a free one)."""
    port = port or free_port()
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))
    server = Server.__new__(Server)
    server.name, server.port, server.log = name, port, workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "ugt", "serve", "--config", str(path), "--port", str(port), "--workers", str(workers)]
    with server.log.open("w") as out:
        server.proc = subprocess.Popen(cmd, cwd=tree, env=env | {"PYTHONPATH": str(tree)}, stdout=out,
                                       stderr=subprocess.STDOUT)
    return server


def roles(server: Server) -> dict[str, list[psutil.Process]]:
    """The server's processes by role: the supervisor, the spawned engine, the HTTP workers."""
    root = psutil.Process(server.proc.pid)
    out: dict[str, list[psutil.Process]] = {"parent": [root], "engine": [], "workers": []}
    for proc in root.children(recursive=True):
        try:
            role = "engine" if "serving.engine_spawn" in " ".join(proc.cmdline()) else "workers"
        except psutil.NoSuchProcess:
            continue
        out[role].append(proc)
    return out


def cpu_by_role(server: Server) -> dict[str, float]:
    spent: dict[str, float] = {}
    for role, procs in roles(server).items():
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        spent[role] = total
    return spent


def measured(server: Server, args: argparse.Namespace, users: Any, redis_port: int, rate: float,
             seed: int) -> dict[str, Any]:
    """One rate on one server: the e2e bench's row plus the CPU per request of each role."""
    before = cpu_by_role(server)
    row = drive(server, users, rate, args, redis_port, seed)
    after = cpu_by_role(server)
    n = max(row["requests"], 1)
    for role in ("workers", "engine", "parent"):
        row[f"{role.rstrip('s')}_cpu_ms_per_req"] = round(1000.0 * (after[role] - before[role]) / n, 4)
    row["load_cpu_ms_per_req"] = round(1000.0 * row["load_cpu_s"] / n, 4)
    row["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return row


def warm_up(server: Server, users: Any, args: argparse.Namespace, redis_port: int) -> None:
    """Every user of the seen pool asked once (all misses), at a rate this machine's engine keeps up with."""
    saved = args.duration
    args.duration = max(1.0, args.warm_users / args.warm_rate)
    try:
        drive(server, users, args.warm_rate, args, redis_port, seed=999, mix=(1.0, 0.0, 0.0))
    finally:
        args.duration = saved


# Run in a subprocess with a tree's own code: the CPU of RedisStateReader's decode of stored states (the raw HMGET
# rows read once from Redis), thread CPU per state over ``rounds`` passes; prints one JSON line.
DECODE_PROBE = """
import json, sys, time
import redis
from contracts.user_state_rule import FEATURE_NAMES
from infra.feast_store import FeastRedisLayout, feature_field
from serving.user_state_reader import RedisStateReader
port, ids, rounds = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
layout = FeastRedisLayout("ugt")
reader = RedisStateReader(redis.Redis(port=port), layout, "user_recent_events")
pipe = reader.client.pipeline(transaction=False)
for user in ids:
    pipe.hmget(layout.entity_key("user_id", user), reader.fields)
rows = pipe.execute()
best = float("inf")
for _ in range(rounds):
    started = time.thread_time()
    for user, raw in zip(ids, rows):
        reader._view(user, raw)
    best = min(best, time.thread_time() - started)
print(json.dumps({"decode_us_per_state": round(1e6 * best / len(ids), 2), "states": len(ids),
                  "mean_events": sum(len(reader._view(u, r).item_ids) for u, r in zip(ids, rows)) / len(ids)}))
"""


# Run like DECODE_PROBE: the rows step of the worker's batch (UGTGenerator.prepare + exclusions, what `gather` does
# per request) for users whose state has one new event since their cached row (an append) and for unchanged ones
# (a hit), on the stored states; thread CPU per request, the best of ``rounds``.
ROWS_PROBE = """
import json, sys, time
from pathlib import Path
import redis
from infra.feast_store import FeastRedisLayout
from serving.ugt_generator import UGTGenerator
from serving.user_state_reader import RedisStateReader, UserStateView
port, ids, rounds, checkpoint = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
reader = RedisStateReader(redis.Redis(port=port), FeastRedisLayout("ugt"), "user_recent_events")
states = [s for s in reader.read_many(ids) if s is not None]
gen = UGTGenerator(Path(checkpoint), kv_cache_users=len(states) + 1, device="cpu")
vocab = list(gen.item_to_index)
def grown(s, r):
    t = s.event_times[-1] + 60_000
    return UserStateView(s.user_id, s.item_ids + (vocab[r % len(vocab)],), s.action_tokens + (2,),
                         s.rating_tokens + (8,), s.event_times + (t,), s.event_count + 1, t, s.state_version)
now = int(time.time())
for s in states:
    gen.prepare(s, now)
best = {"append": float("inf"), "hit": float("inf")}
for r in range(rounds):
    states = [grown(s, r) for s in states]
    for kind in ("append", "hit"):
        started = time.thread_time()
        for s in states:
            gen.exclusions(gen.prepare(s, now), frozenset(s.item_ids))
        best[kind] = min(best[kind], time.thread_time() - started)
print(json.dumps({f"rows_{k}_us_per_request": round(1e6 * v / len(states), 2) for k, v in best.items()}))
"""


# Run like DECODE_PROBE, with the bench's Redis in UGT_REDIS_PORT: the worker's /recommend lane in one process
# without uvicorn (the app's ASGI callable called with a parsed request, as uvicorn's protocol calls it) through
# the batcher thread: guards, parse, submit, the batch (a pipelined state read of the stored states, the popularity
# generator, the reranker, the answer's JSON, the metrics) and the response messages. ``concurrency`` requests at a
# time so batches form; process CPU (both threads) per request, the best of ``rounds``.
LANE_PROBE = """
import asyncio, json, sys, time
import uvloop
from infra.settings import get_settings
from serving.app import create_app
from serving.config import ServingConfig
ids, rounds, concurrency = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = ServingConfig(generator="popularity", engine="thread", batch_max_wait_ms=0.5, log_level="warning")
app = create_app(get_settings(), config)
bodies = [json.dumps({"user_id": user, "k": 10}).encode() for user in ids]
async def one(body):
    sent = []
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": "/recommend", "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent
async def main():
    async with app.router.lifespan_context(app):
        best = float("inf")
        for r in range(rounds + 1):
            started = time.process_time()
            for lo in range(0, len(bodies), concurrency):
                await asyncio.gather(*[one(b) for b in bodies[lo:lo + concurrency]])
            if r:  # the first round warms up
                best = min(best, time.process_time() - started)
    print(json.dumps({"lane_us_per_request": round(1e6 * best / len(bodies), 2), "lane_concurrency": concurrency}))
uvloop.install()
asyncio.run(main())
"""


def probe(code: str, tree: Path, *argv: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    got = subprocess.run([sys.executable, "-c", code, *argv], cwd=tree,
                         env=os.environ | (env or {}) | {"PYTHONPATH": str(tree)},
                         check=True, capture_output=True, text=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def decode_cost(trees: dict[str, Path], redis_port: int, ids: list[str], rounds: int, passes: int,
                checkpoint: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """Each tree's state decode per user, rows per request and HTTP lane per request (the best of ``rounds`` in
    each of ``passes`` interleaved subprocesses per tree)."""
    out = []
    for i in range(passes):
        for name, tree in trees.items() if i % 2 == 0 else reversed(trees.items()):
            row = probe(DECODE_PROBE, tree, str(redis_port), json.dumps(ids), str(rounds))
            row |= probe(ROWS_PROBE, tree, str(redis_port), json.dumps(ids), str(rounds), checkpoint)
            row |= probe(LANE_PROBE, tree, json.dumps(ids), str(rounds), "16", env=env)
            out.append({"config": name, "pass": i, **row})
    return out


def summary(rows: list[dict[str, Any]], names: tuple[str, str]) -> list[dict[str, Any]]:
    """Per rate: each tree's mean worker CPU per request over the repeats, and current / baseline."""
    out = []
    for rate in sorted({r["offered_qps"] for r in rows}):
        mean = {}
        for name in names:
            got = [r["worker_cpu_ms_per_req"] for r in rows if r["config"] == name and r["offered_qps"] == rate]
            mean[name] = round(sum(got) / len(got), 4) if got else None
        base, new = mean[names[0]], mean[names[1]]
        out.append({"offered_qps": rate, f"{names[0]}_worker_cpu_ms_per_req": base,
                    f"{names[1]}_worker_cpu_ms_per_req": new,
                    "ratio": round(new / base, 3) if base and new else None})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="ugt-worker-cpu-"))
    base_tree, base_commit = extract(args.baseline, workdir / "baseline-tree")
    redis_proc, redis_port = start_redis(workdir, args.redis_port)
    env = os.environ | {"UGT_REDIS_PORT": str(redis_port), "UGT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    users = ml1m_users(Path(args.checkpoint), args.clones, args.append_room, args.seed)
    config = ugt_config(args, users) | {"engine_scope": "model", "engine_start": "spawn",
                                        "batch_max_wait_ms": args.batch_wait_ms, "torch_compile": False}
    names = ("baseline", "current")
    servers: dict[str, Server] = {}
    rows: list[dict[str, Any]] = []
    decode: list[dict[str, Any]] = []
    try:
        users.write_initial(redis.Redis(port=redis_port))
        decode = decode_cost(dict(zip(names, (base_tree, REPO), strict=True)), redis_port, users.ids[:2000],
                             rounds=5, passes=args.probe_passes, checkpoint=str(Path(args.checkpoint).resolve()),
                             env=env)
        print_table(decode)
        rates = [float(r) for r in args.rates.split(",") if r]
        for i, (name, tree) in enumerate(zip(names, (base_tree, REPO), strict=True) if rates else ()):
            port = args.port_base + i if args.port_base else None  # --rates "": probes only
            servers[name] = serve(name, tree, workdir, env, config, args.workers, port)
        seen: dict[str, int] = {}
        for name, server in servers.items():
            wait_served(server, users.ids[0], model=True)
            users.reset()
            warm_up(server, users, args, redis_port)
            seen[name] = users.seen
        for repeat in range(args.repeats):
            for i, rate in enumerate(rates):
                order = names if (repeat + i) % 2 == 0 else names[::-1]  # who goes first alternates
                for name in order:
                    users.seen = seen[name]
                    row = measured(servers[name], args, users, redis_port, rate, args.seed + 100 * repeat + i)
                    seen[name] = users.seen
                    row["repeat"] = repeat
                    rows.append(row)
                    print_table([row], list(COLUMNS))
    finally:
        for server in servers.values():
            server.stop()
        redis_proc.terminate()
        redis_proc.wait()
    return {"baseline_commit": base_commit, "users": users.describe(), "decode": decode, "rows": rows,
            "summary": summary(rows, names)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = {k: v for k, v in vars(args).items() if k not in ("out", "mix_shares", "smoke")}
    conditions["measured"] = ("rows: CPU seconds of the HTTP worker processes (psutil, user + system) over the "
                              "rate's window / requests sent; the supervisor, the engine and the load processes apart. "
                              "decode: each tree's code in its own subprocess on the same stored states (2,000 users "
                              "read once from Redis): thread CPU of RedisStateReader's decode per state, and of "
                              "UGTGenerator.prepare + exclusions per request for a state with one new event (append) "
                              "and an unchanged one (hit); best of 5 rounds per subprocess")
    return run_and_write(args, "worker_cpu", conditions, run, lambda result: result["summary"])


def run_and_write(args: argparse.Namespace, name: str, conditions: dict[str, Any],
                  run: Callable[[argparse.Namespace], dict[str, Any]],
                  table: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> int:
    """Stamp the start, run the bench, print ``table(result)`` and write the result file ``args.out``; 0."""
    conditions["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = run(args)
    print_table(table(result))
    write_result(Path(args.out), name, conditions, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
