"""What Redis durability costs the user_state write path: AOF fsync policy vs batch size (issue #20).

For each policy (the old `appendonly no` + RDB, AOF `everysec`, AOF `always`) a private redis-server (the
stack's own command line, infra/redis_conf.py) takes what user_state's OnlineStateWriter sends per flush: one
pipeline of HSETs (one Feast-sized row per user) plus one popularity Lua call (jobs/popularity_writer.py, the
real script). Batches of 1 to 500 users: under light traffic a flush holds few users, so the fsync per batch
weighs more per row. Reported per cell: batch latency p50/p99 (ms), rows/s from one client, redis-server CPU
seconds per 10,000 rows. `python -m bench.redis_durability --help`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import redis
from tqdm import tqdm

from bench.common import print_table, result_path, write_result
from infra.redis_conf import redis_server_args
from infra.settings import get_settings
from jobs.popularity_writer import redis_popularity_writer

POLICIES = {"rdb-only (old)": None, "aof everysec": "everysec", "aof always": "always"}
ROW_FIELDS = 12  # a user_recent_events row: ~12 features, ~700 bytes in all


def start_redis(port: int, workdir: Path, appendfsync: str | None) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    args = redis_server_args(port, workdir, workdir / "redis.log", appendfsync or "everysec")
    if appendfsync is None:  # what the stack ran before issue #20
        args = [a if a != "yes" or args[i - 1] != "--appendonly" else "no" for i, a in enumerate(args)]
        args += ["--save", "60 1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server on {port} did not start; see {workdir / 'redis.log'}") from None
            time.sleep(0.05)


def one_batch(client: redis.Redis, incr, batch: int, start_user: int, seq: dict[str, int]) -> None:
    """One OnlineStateWriter flush: a pipeline of whole-row HSETs, then the popularity script."""
    pipe = client.pipeline(transaction=False)
    users: dict[str, tuple[str, list[tuple[int, str]]]] = {}
    for u in range(start_user, start_user + batch):
        user = f"bench-user-{u % 20_000}"
        seq[user] = seq.get(user, 0) + 1
        fields = {f"f{i}".encode(): os.urandom(56) for i in range(ROW_FIELDS)}
        pipe.hset(user.encode(), mapping=fields)
        users[user] = ("origin", [(seq[user], f"item-{random.randrange(3000)}")])
    pipe.execute()
    incr({"bench": users})


def measure(port: int, workdir: Path, appendfsync: str | None, batch: int, rows: int) -> dict[str, Any]:
    shutil.rmtree(workdir, ignore_errors=True)
    proc = start_redis(port, workdir, appendfsync)
    try:
        client = redis.Redis(port=port)
        incr = redis_popularity_writer(client)
        server = psutil.Process(proc.pid)
        seq: dict[str, int] = {}
        one_batch(client, incr, batch, 0, seq)  # warm-up: script loaded, connection open
        cpu0 = sum(server.cpu_times()[:2])
        latencies = []
        t0 = time.perf_counter()
        for start in range(0, rows, batch):
            t = time.perf_counter()
            one_batch(client, incr, batch, start, seq)
            latencies.append((time.perf_counter() - t) * 1000)
        wall = time.perf_counter() - t0
        cpu = sum(server.cpu_times()[:2]) - cpu0
        latencies.sort()
        return {"batch_users": batch, "batches": len(latencies),
                "p50_ms": round(statistics.median(latencies), 3),
                "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
                "rows_per_s": round(len(latencies) * batch / wall),
                "redis_cpu_s_per_10k_rows": round(cpu / (len(latencies) * batch) * 10_000, 3)}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=get_settings().redis_port + 20,
                        help="port of the private redis-server (default: UGT_REDIS_PORT + 20 = %(default)s)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows written per cell (default: %(default)s)")
    parser.add_argument("--batches", default="1,10,100,500", help="batch sizes in users (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=get_settings().var_dir / "bench-redis-durability")
    parser.add_argument("--out", type=Path, default=result_path("redis_durability"))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.batches.split(",")]
    rows_out = []
    cells = [(name, size) for name in POLICIES for size in sizes]
    for name, size in tqdm(cells, desc="policy x batch", file=sys.stderr):
        rows = max(size * 20, args.rows if size > 1 else args.rows // 10)  # batch 1: one round trip a row
        rows_out.append({"policy": name, **measure(args.port, args.workdir, POLICIES[name], size, rows)})
    shutil.rmtree(args.workdir, ignore_errors=True)
    print_table(rows_out)
    disk = psutil.disk_usage(str(args.workdir.parent))
    write_result(args.out, "redis_durability", {
        "workload": "per batch: a non-transactional pipeline of HSETs (12 fields x 56 random bytes per user, "
                    "20,000 distinct users) + one popularity Lua call (jobs/popularity_writer.py); one client, "
                    "batches back to back (closed loop)",
        "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
        "server_args": "infra/redis_conf.py redis_server_args; rdb-only = --appendonly no --save '60 1000'",
        "disk": f"the AOF on {args.workdir.parent} ({disk.total // 2**30} GiB volume, virtio block device)",
        "load": f"shared 2-core box, load average {os.getloadavg()[0]:.1f} at the end",
        "rows_per_cell": args.rows,
    }, {"rows": rows_out}, argv=argv, prog="python -m bench.redis_durability" if argv is not None else None)


if __name__ == "__main__":
    main()
