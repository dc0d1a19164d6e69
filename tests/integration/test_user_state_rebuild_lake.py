"""Redis loses all its data; `ugt jobs rebuild-user-state` puts user_state's part back from the lake (issue #20).

tokenize (writing its parquet lake to a temp folder) and user_state run on a PRIVATE Flink cluster
(tests/integration/user_state_exactly_once_cluster.py) over 20,000 ML-1M events; user_state writes to a PRIVATE
redis-server, so emptying it touches nothing else of the stack. Once every user's recent and long-term rows equal
the offline fold, the test records what user_state wrote (every row, the popularity ZSET, every applied key),
stops the jobs, FLUSHALLs that Redis and runs the documented command. Everything must be back, equal to what it
was. The command first refuses while user_state still runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from test_user_state_exactly_once import LATENESS_S, MAX_EVENTS, ensure_feast_applied, online_rows, wait_for
from user_state_exactly_once_cluster import PrivateFlinkCluster, free_port

from contracts.datasets import load_dataset, user_events
from contracts.redis_keys import applied_key, popularity_key
from contracts.tokenizer import tokenize_event
from contracts.user_state_rule import (
    FEATURE_NAMES,
    LONG_TERM_FEATURE_NAMES,
    LONG_TERM_VIEW,
    compact,
    fold_events,
    long_term_row,
)
from infra.settings import REPO_ROOT, Settings
from jobs.common import _JobSettings
from jobs.lake import read_lake
from streams.producer import EventPublisher
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 20_000
COMPACT_MIN = 0.05  # 3 s: the long-term rows are final soon after the last event


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A private, empty redis-server on a free port (no persistence: the test empties it anyway)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for("the private redis-server", lambda: _pings(url), 30, every_s=0.2)
    return server, url


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def user_state_data(settings: Settings, client: redis.Redis, domain: str, users: list[str]) -> dict:
    """Everything user_state keeps in Redis for these users and this domain."""
    return {
        "recent": online_rows(settings, "user_recent_events", FEATURE_NAMES, users),
        "long": online_rows(settings, LONG_TERM_VIEW, LONG_TERM_FEATURE_NAMES, users),
        "popularity": client.zrange(popularity_key(domain), 0, -1, withscores=True),
        "applied": {u: client.get(applied_key(domain, u)) for u in users},
    }


def lake_events(lake: Path) -> int:
    try:
        return len(read_lake(lake))
    except FileNotFoundError:  # nothing committed yet
        return 0


def rebuild_command(lake: Path, redis_url: str, rest: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ugt", "jobs", "--rest", rest, "rebuild-user-state", "--lake", str(lake),
         "--redis", redis_url, "--max-events", str(MAX_EVENTS), "--allowed-lateness-s", str(LATENESS_S)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def test_rebuild_user_state_from_the_lake_after_redis_lost_everything(stack: Settings, tmp_path: Path) -> None:
    settings = stack
    run = uuid.uuid4().hex[:8]
    raw, tokens, dlq = f"rb-{run}.raw", f"rb-{run}.tokens", f"rb-{run}.dlq"
    domain = f"rb{run}"
    lake = tmp_path / "lake"
    ensure_topics(settings, extra=[TopicSpec(raw), TopicSpec(tokens), TopicSpec(dlq, 1)])
    ensure_feast_applied(settings)
    server, redis_url = start_redis(tmp_path / "redis")
    private = _JobSettings(redis_override=redis_url)
    client = redis.Redis.from_url(redis_url)
    cluster = PrivateFlinkCluster(settings, tmp_path / "flink")
    common = ["--startup", "earliest", "--parallelism", "2", "--checkpoint-interval-ms", "2000",
              "--checkpoint-dir", str(tmp_path / "flink" / "checkpoints")]
    submissions = [
        ("tokenize", [*common, "--delivery", "exactly-once", "--group-id", f"rb-{run}-tok", "--lake", str(lake),
                      "--source-topic", raw, "--tokens-topic", tokens, "--dlq-topic", dlq]),
        ("user_state", [*common, "--group-id", f"rb-{run}-us", "--source-topic", tokens, "--dlq-topic", dlq,
                        "--redis", redis_url, "--max-events", str(MAX_EVENTS),
                        "--allowed-lateness-s", str(LATENESS_S), "--compact-interval-min", str(COMPACT_MIN)]),
    ]
    jobs: list[str] = []

    def start_jobs() -> None:
        cluster.start()
        with ThreadPoolExecutor(2) as pool:
            jobs.extend(pool.map(lambda sub: cluster.submit(*sub), submissions))

    background = ThreadPoolExecutor(1)
    starting = background.submit(start_jobs)
    try:
        events = [{**e, "user_id": f"r{run}-{e['user_id']}", "event_id": f"r{run}-{e['event_id']}", "domain": domain}
                  for e in user_events(load_dataset("ml-1m"), limit=N_EVENTS)]
        with EventPublisher(settings) as publisher:
            for e in events:
                publisher.publish_user_event(e, topic=raw)
        states, _ = fold_events([tokenize_event(e) for e in events], MAX_EVENTS, LATENESS_S * 1000)
        expected_recent = {u: s.to_feature_row() for u, s in states.items()}
        expected_long = {u: long_term_row(compact(None, s), s) for u, s in states.items()}
        users = sorted(expected_recent)
        starting.result()

        def jobs_done() -> bool:
            for jid in jobs:
                failures = cluster.failures(jid)
                assert not failures, f"job {jid} failed:\n{failures[0]}"
            recent = online_rows(private, "user_recent_events", FEATURE_NAMES, users)
            return recent == expected_recent and \
                online_rows(private, LONG_TERM_VIEW, LONG_TERM_FEATURE_NAMES, users) == expected_long

        wait_for("user_state to write every user's final rows", jobs_done, 600, every_s=5)
        wait_for("the lake to commit every event", lambda: lake_events(lake) == N_EVENTS, 120, every_s=2)
        before = user_state_data(private, client, domain, users)
        assert sum(score for _, score in before["popularity"]) == N_EVENTS
        assert all(before["applied"].values())

        refused = rebuild_command(lake, redis_url, cluster.rest)
        assert refused.returncode == 1 and "RUNNING" in refused.stderr, refused.stderr

        for jid in jobs:
            cluster.cancel(jid)
        wait_for("the jobs to stop", lambda: all(cluster.job(j)["state"] in ("CANCELED", "FAILED", "FINISHED")
                                                  for j in jobs), 120)
        client.flushall()  # Redis lost its data
        assert user_state_data(private, client, domain, users) != before

        started = time.monotonic()
        done = rebuild_command(lake, redis_url, cluster.rest)
        assert done.returncode == 0, done.stderr[-3000:]
        print(f"\n{done.stdout.strip()} in {time.monotonic() - started:.1f} s")
        after = user_state_data(private, client, domain, users)
        for part in ("recent", "long", "applied"):
            differing = [u for u in users if after[part][u] != before[part][u]]
            assert not differing, f"{len(differing)} users' {part} differ after the rebuild, e.g. {differing[:3]}"
        assert after["popularity"] == before["popularity"]
        print(f"rebuilt: {len(users)} users, {N_EVENTS} events, all equal to what user_state had written")
    finally:
        background.shutdown(wait=True)
        for jid in jobs:
            cluster.cancel(jid)
        cluster.stop()
        client.close()
        server.terminate()
        server.wait(timeout=30)
