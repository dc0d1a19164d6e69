"""`ugt demo`: the main job end to end, the way a user would run it by hand.

stack up -> feast apply -> fetch ML-1M -> submit the Flink jobs -> replay events into Kafka ->
wait until the user_state job has applied them -> start /recommend -> query a few users -> print.
Each step runs the same `ugt` / `feast` command the README shows, so the demo proves those commands.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from infra.settings import REPO_ROOT, get_settings

BIN = Path(sys.executable).parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-1m", choices=("ml-1m", "ml-100k"), help="dataset to replay")
    parser.add_argument("--limit", type=int, default=100_000,
                        help="user events to replay, in event-time order (default: %(default)s; 0 = all)")
    parser.add_argument("--users", type=int, default=5, help="users to query /recommend for (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="items per answer (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=900.0,
                        help="how long to wait for the jobs to apply every event (default: %(default)s)")
    parser.add_argument("--keep-serving", action="store_true", help="leave `ugt serve` running at the end")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(*cmd: str) -> None:
    """Run a command as the user would, streaming its output; stop the demo if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(list(cmd), cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit code {result.returncode}; see its output above")


def applied_events(redis_client, domain: str = "movie") -> int:
    """Events the user_state job has applied: the sum of the popularity counts it keeps per domain."""
    from jobs.user_state_logic import popularity_key

    return int(sum(score for _, score in redis_client.zscan_iter(popularity_key(domain))))


def wait_until_applied(redis_client, before: int, count: int, timeout_s: float) -> float:
    """Poll until `count` more events than `before` are applied; returns the seconds waited."""
    from tqdm import tqdm

    start = time.monotonic()
    done = applied_events(redis_client) - before
    with tqdm(total=count, initial=min(done, count), desc="applied by Flink", unit="ev", unit_scale=True) as bar:
        while done < count:
            if time.monotonic() - start > timeout_s:
                raise SystemExit(
                    f"demo: only {done:,} of {count:,} events applied after {timeout_s:.0f} s; "
                    "check `ugt jobs list` and var/log/flink/"
                )
            time.sleep(1.0)
            now = applied_events(redis_client) - before
            bar.update(min(now, count) - min(done, count))
            done = now
    return time.monotonic() - start


def run(args: argparse.Namespace) -> int:
    import redis
    import requests

    settings = get_settings()
    ugt = str(BIN / "ugt")

    step("1. local stack: Kafka (KRaft), Schema Registry, Redis, Flink")
    sh(ugt, "stack", "up")

    step("2. Feast repo: register entities and feature views")
    sh(str(BIN / "feast"), "-c", "feature_repo", "apply")

    step(f"3. fetch {args.dataset} and convert it to UGT events")
    sh(ugt, "data", "fetch", args.dataset)

    r = redis.Redis.from_url(settings.redis_url)
    before = applied_events(r)

    step("4. submit the Flink jobs (tokenize, user_state) to the standalone cluster")
    from jobs.cli import JOBS, list_jobs

    running = {j["name"] for j in list_jobs(settings.flink_rest_url) if j["state"] == "RUNNING"}
    if running.issuperset(JOBS):
        print("tokenize and user_state are already running (`ugt jobs list`): not submitting them twice")
    else:
        for job in JOBS:
            if job not in running:
                sh(ugt, "jobs", "submit", "--detached", job)

    step("5. replay events into Kafka in event-time order")
    replay = [ugt, "publish", "replay", args.dataset, "--items"]
    if args.limit:
        replay += ["--limit", str(args.limit)]
    sh(*replay)
    from streams.datasets import load_dataset

    dataset = load_dataset(args.dataset)
    ratings = dataset.ratings
    title_of = dict(zip(dataset.items["item_id"], dataset.items["title"], strict=True))
    published = len(ratings) if not args.limit else min(args.limit, len(ratings))

    step("6. wait until every event is in the users' state (Redis, through Feast)")
    took = wait_until_applied(r, before, published, args.timeout_s)
    print(f"{published:,} events applied {took:.1f} s after the replay finished")

    step("7. serve /recommend and query it")
    server = subprocess.Popen([ugt, "serve", "--port", str(settings.serving_port)], cwd=REPO_ROOT)
    base = f"http://localhost:{settings.serving_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: `ugt serve` did not become healthy; see its output above")
            time.sleep(0.5)
        ordered = ratings.sort_values(["timestamp", "row"], kind="stable")
        if args.limit:
            ordered = ordered.head(args.limit)
        users = list(ordered["user_id"].value_counts().index[: args.users]) + ["no-such-user"]
        for user in users:
            answer = requests.post(f"{base}/recommend", json={"user_id": user, "k": args.k}, timeout=10).json()
            titles = "; ".join(title_of.get(i["item_id"], i["item_id"]) for i in answer.get("items", []))
            print(f"user {user:>12}  fallback={answer.get('fallback')!s:5}  model={answer.get('model')}\n    {titles}")
        print("\nfull answer for the first user:")
        print(json.dumps(requests.post(f"{base}/recommend", json={"user_id": users[0], "k": 3}, timeout=10).json(),
                         indent=2))
    finally:
        if not args.keep_serving:
            server.terminate()
            server.wait(timeout=30)
    print("\nDone. The stack and the Flink jobs keep running: `ugt jobs list`, `ugt stack status`, `ugt stack down`.")
    return 0
