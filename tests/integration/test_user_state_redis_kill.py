"""Redis loss is survivable: kill -9 redis-server while user_state runs, and no event is lost (issue #20).

Before the stack ran the AOF, Redis kept RDB snapshots only: a kill -9 lost what it had acknowledged since its last
snapshot, while user_state had already confirmed those writes (its confirm timers cleared them) and checkpointed
past them, so the restore never wrote them again and users stayed events short for good. Now the stack's Redis
runs the AOF (appendfsync always on the single node, infra/redis_conf.py): an acknowledged write is on disk. And
user_state (process mode here) flushes its buffered writes at the end of every bundle, which Flink ends before a
checkpoint barrier passes, so a checkpoint completes only over writes Redis acknowledged (the test finds
each worker's log line of its first bundle-end flush: the hook ran in the real workers).

Mirrors tests/integration/test_user_state_exactly_once.py (its helpers, its offline reference): tokenize +
user_state run on a PRIVATE Flink cluster; once user_state has checkpointed and written part of the replay, the
STACK's redis-server gets `kill -9` and is started again by `infra.stack.up(only=["redis"])`; user_state fails on
the lost connection, restores from its last checkpoint and finishes. Then every user's `user_recent_events` row
equals the offline fold, and the popularity ZSET counts every applied event exactly once. A loss names its layer:
the tokens topic (tokenize) or user_state's popularity writes (a user's applied n short).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from test_user_state_exactly_once import (
    LATENESS_S,
    MAX_EVENTS,
    ensure_feast_applied,
    make_events,
    online_rows,
    popularity,
    read_topic,
    wait_for,
)
from user_state_exactly_once_cluster import PrivateFlinkCluster

from contracts.redis_keys import applied_key, popularity_key
from contracts.tokenizer import tokenize_event
from contracts.user_state_rule import FEATURE_NAMES, fold_events
from infra import stack as stack_mod
from infra.processes import owned_pids, pid_alive
from infra.settings import Settings
from streams.producer import EventPublisher
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONVERGE_TIMEOUT_S = 900


def kill_redis(settings: Settings) -> list[int]:
    """kill -9 the stack's redis-server (what a crashed node looks like to its clients)."""
    pids = owned_pids(settings, "redis")
    assert pids, "the stack's redis-server is not running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"redis-server {pids} survived kill -9"
        time.sleep(0.05)
    return pids


def where_lost(settings: Settings, client: redis.Redis, domain: str, tokens_topic: str,
               expected: Counter[str]) -> str:
    """Which layer lost events: the tokens topic (tokenize) or user_state's writes (a user's applied n short)."""
    from streams.serde import AvroSerde, SchemaRegistryClient

    serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
    in_topic = Counter(serde.decode(v).record["user_id"] for v in read_topic(settings, tokens_topic))
    topic_short = {u: n - in_topic[u] for u, n in expected.items() if in_topic[u] < n}
    applied = {u: client.get(applied_key(domain, u)) for u in expected}
    written_short = {u: n - int((applied[u] or b"0 ").split()[0]) for u, n in expected.items()
                     if int((applied[u] or b"0 ").split()[0]) < n}
    return (f"tokens topic short for {len(topic_short)} users ({sum(topic_short.values())} events, "
            f"e.g. {dict(list(topic_short.items())[:3])}); popularity writes short for {len(written_short)} users "
            f"({sum(written_short.values())} events, e.g. {dict(list(written_short.items())[:3])})")


def settle(count, total: int, quiet_s: float = 90.0) -> int:
    """Wait until `count()` reaches `total`, or stops moving for `quiet_s` (a loss), or CONVERGE_TIMEOUT_S passes."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        value = count()
        if value >= total:
            return value
        if value != last:
            last, since = value, time.monotonic()
            print(f"  {value}/{total} applied after the restore", end="\r", flush=True)
        elif time.monotonic() - since > quiet_s:
            return value
        time.sleep(2)
    return count()


def test_kill_redis_mid_stream_loses_no_event(stack: Settings, tmp_path: Path) -> None:
    settings = stack
    assert redis.Redis.from_url(settings.redis_url).config_get("appendonly")["appendonly"] == "yes"
    run = uuid.uuid4().hex[:8]
    raw, tokens, dlq = f"rk-{run}.raw", f"rk-{run}.tokens", f"rk-{run}.dlq"
    domain = f"rk{run}"
    ensure_topics(settings, extra=[TopicSpec(raw), TopicSpec(tokens), TopicSpec(dlq, 1)])
    ensure_feast_applied(settings)
    cluster = PrivateFlinkCluster(settings, tmp_path / "flink")
    common = ["--startup", "earliest", "--checkpoint-interval-ms", "2000",
              "--checkpoint-dir", str(tmp_path / "flink" / "checkpoints")]
    # user_state at parallelism 1 (the exactly-once test covers 2) and in process mode (the exactly-once test
    # covers thread mode). Process mode was first chosen while scipy was in the venv: Feast's dask import pulls in
    # scipy's pybind11 modules, whose import deadlocks inside the thread-mode (pemja) interpreter (the task hung in
    # open()); the project no longer depends on scipy (docs/DEPENDENCIES.md)
    submissions = [
        # tokenize's Python engine: its per-record pace keeps the replay running until Redis is killed (the sql
        # engine, the default, applied all 100,000 events first on the 2-core box); this test is about user_state
        ("tokenize", [*common, "--parallelism", "2", "--delivery", "exactly-once", "--group-id", f"rk-{run}-tok",
                      "--source-topic", raw, "--tokens-topic", tokens, "--dlq-topic", dlq, "--engine", "python"]),
        ("user_state", [*common, "--parallelism", "1", "--execution-mode", "process", "--group-id", f"rk-{run}-us",
                        "--source-topic", tokens,
                        "--dlq-topic", dlq,
                        "--max-events", str(MAX_EVENTS), "--allowed-lateness-s", str(LATENESS_S),
                        "--flush-ms", "200"]),
    ]
    jobs: list[str] = []

    def start_jobs() -> None:
        cluster.start()
        with ThreadPoolExecutor(2) as pool:
            jobs.extend(pool.map(lambda sub: cluster.submit(*sub), submissions))

    background = ThreadPoolExecutor(1)
    starting = background.submit(start_jobs)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        events, _ = make_events(run, domain)
        with EventPublisher(settings) as publisher:
            for e in events:
                publisher.publish_user_event(e, topic=raw)
        token_events = [tokenize_event(e) for e in events]
        states, late = fold_events(token_events, MAX_EVENTS, LATENESS_S * 1000)
        assert not late
        expected_popularity = dict(Counter(t.item_id for t in token_events))
        expected_recent = {u: s.to_feature_row() for u, s in states.items()}
        users = sorted(expected_recent)
        total = len(token_events)
        starting.result()
        user_state_jid = jobs[1]

        def mid_stream() -> bool:
            for jid in jobs:
                failures = cluster.failures(jid)
                assert not failures, f"job {jid} failed before the kill:\n{failures[0]}"
            done = sum(popularity(client, domain).values())
            assert done < total, "the replay finished before the kill; make it longer"
            completed = cluster.checkpoints(user_state_jid).get("counts", {}).get("completed", 0)
            print(f"  {done}/{total} applied, {completed} checkpoints", end="\r", flush=True)
            return done >= total // 4 and completed >= 1

        wait_for("user_state to be mid-stream", mid_stream, 420, every_s=0.5)
        checkpoints_before = cluster.checkpoints(user_state_jid)["counts"]["completed"]
        before = sum(popularity(client, domain).values())
        kill_redis(settings)
        print(f"\nkill -9 redis-server at {before}/{total} applied events, after {checkpoints_before} checkpoints")
        time.sleep(2)  # user_state meets the dead connection, fails and restarts (fixed-delay 1 s, 20 attempts)
        stack_mod.up(only=["redis"], settings=settings, log=lambda line: None)
        survived = sum(popularity(client, domain).values())
        assert survived >= before, f"Redis came back with {survived} applied events, had acknowledged {before}"

        def user_state_restored() -> bool:
            latest = (cluster.checkpoints(user_state_jid).get("latest") or {}).get("restored")
            return bool(latest) and cluster.job(user_state_jid)["state"] == "RUNNING"

        wait_for("user_state to restore from a checkpoint", user_state_restored, 180)
        counted = settle(lambda: sum(popularity(client, domain).values()), total)
        assert counted == total, (f"{total - counted} events lost (or {counted - total} counted twice): "
                                  + where_lost(settings, client, domain, tokens,
                                               Counter(t.user_id for t in token_events)))
        assert popularity(client, domain) == expected_popularity  # 0 lost, 0 applied twice
        # process mode: every worker (the restored one too) hooks the end of each bundle, which Flink ends before a
        # barrier passes (jobs/operators/bundle_flush.py), and the writes went out there. A worker logs its first
        # bundle-end flush only when rows were still pending then: with micro-batches (--batch-ms) a restored worker
        # may have written everything at its batches' own due flushes, so one such line is required, not one each.
        lines = [line for path in cluster.log.glob("*taskexecutor*.log")
                 for line in path.read_text(errors="replace").splitlines()]
        hooked = [line for line in lines if "writes flushed at every bundle end" in line]
        flushed = [line for line in lines if "first flush at a bundle end" in line]
        assert len(hooked) >= 2, f"user_state's bundle-end hook was not installed in both workers: {hooked}"
        assert flushed, "user_state never flushed at a bundle end"

        def recent_rows_match() -> list[str]:
            recent = online_rows(settings, "user_recent_events", FEATURE_NAMES, users)
            return [u for u in users if recent[u] != expected_recent[u]]

        deadline = time.monotonic() + 60  # the last confirm flushes land within a flush interval or two
        while (differing := recent_rows_match()) and time.monotonic() < deadline:
            time.sleep(2)
        assert not differing, f"{len(differing)} users' rows differ from the offline fold, e.g. {differing[:3]}"
        print(f"after the Redis kill: {len(users)} users and {total} events, all equal the offline fold")
    finally:
        background.shutdown(wait=True)
        for jid in jobs:
            cluster.cancel(jid)
        cluster.stop()
        client.delete(popularity_key(domain), *client.scan_iter(applied_key(domain, "*"), count=1000))
