"""Exactly-once effect of tokenize + user_state on real Kafka, Flink, Redis and Feast, with a kill -9 mid-replay.

Issue #4's (a) and (b): 100,000 ML-1M events (plus a few deliberately late ones) go through both jobs on a
PRIVATE standalone Flink cluster (tests/integration/user_state_exactly_once_cluster.py: own ports, same
lib/), so killing its TaskManager does not hurt the shared one. Once user_state has checkpointed and
written part of the replay, the TaskManager gets `kill -9`; a new TaskManager starts, both jobs restore from
their last checkpoint (the test reads `latest.restored` from Flink's REST API) and finish the replay.
Then, compared with what the same code computes offline from the same events
(contracts.user_state_rule.fold_events / long_term_rows_from_events, in publish order = per-user Kafka order):
  * every user's `user_recent_events` row in Feast is exactly equal (the real-time path);
  * every user's `user_long_term` row is exactly equal (the nearline compaction, on a 3 s timer here);
  * the popularity ZSET counts every applied event exactly once: 0 lost, 0 applied twice;
  * the late events are in the DLQ as LATE_EVENT, the offline rule rejects the same ones.
Users, event ids, topics, consumer groups and the popularity domain carry a run id.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from user_state_exactly_once_cluster import PrivateFlinkCluster

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
from infra.feast_store import open_feature_store
from infra.settings import REPO_ROOT, Settings
from streams.producer import EventPublisher
from streams.serde import AvroSerde, SchemaRegistryClient
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 100_000
N_LATE = 20
# the first BACKLOG events wait in Kafka before the jobs start; the rest arrive at PACE_PER_S while they run, so the
# replay lasts seconds and the kill lands after a completed checkpoint (user_state applies 100,000 events in ~3 s,
# faster than its first checkpoint can complete behind them)
BACKLOG = 20_000
PACE_PER_S = 10_000
MAX_EVENTS = 50  # a small window, so many users spill into the long-term history
LATENESS_S = 86_400
COMPACT_MIN = 0.05  # 3 s
CONVERGE_TIMEOUT_S = 420


def read_topic(settings: Settings, topic: str) -> list[bytes]:
    """Every committed value of a topic, from the beginning to the current end."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: hi for p in partitions
                for lo, hi in [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)] if hi > lo}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[bytes] = []
        deadline = time.monotonic() + 120
        while ends and any(tp.offset < ends[tp.partition]
                           for tp in consumer.position([TopicPartition(topic, p) for p in ends])):
            assert time.monotonic() < deadline, f"timed out reading {topic}"
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                out.append(msg.value())
        return out
    finally:
        consumer.close()


def ensure_feast_applied(settings: Settings) -> None:
    store = open_feature_store(settings)
    try:
        store.get_feature_view(LONG_TERM_VIEW)
        store.get_feature_view("user_recent_events")
    except Exception:  # registry empty or older than the repo: apply it (what `ugt stack up` users do once)
        subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "feast"), "-c", str(settings.feature_repo), "apply"],
                       check=True)


def publish(settings: Settings, events: list[dict[str, Any]], topic: str, per_s: float = 0.0) -> None:
    """Publish ``events`` in order (at most ``per_s`` a second when given), flushed before returning."""
    with EventPublisher(settings) as publisher:
        began = time.monotonic()
        for i, e in enumerate(events):
            if per_s and i % 1000 == 0 and (ahead := i / per_s - (time.monotonic() - began)) > 0:
                time.sleep(ahead)
            publisher.publish_user_event(e, topic=topic)


def make_events(run: str, domain: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the first N_EVENTS ML-1M events, renamed for this run; N_LATE late events for some of their users)."""
    events = [{**e, "user_id": f"x{run}-{e['user_id']}", "event_id": f"x{run}-{e['event_id']}", "domain": domain}
              for e in user_events(load_dataset("ml-1m"), limit=N_EVENTS)]
    first: dict[str, dict[str, Any]] = {}
    for e in events:
        first.setdefault(e["user_id"], e)
    late = [{**e, "event_id": f"x{run}-late-{i}", "event_time": e["event_time"] - 3 * LATENESS_S * 1000}
            for i, e in enumerate(list(first.values())[:N_LATE])]
    return events, late


def online_rows(settings: Settings, view: str, names: tuple[str, ...], users: list[str]) -> dict[str, dict]:
    online = open_feature_store(settings).get_online_features(
        features=[f"{view}:{f}" for f in names], entity_rows=[{"user_id": u} for u in users]).to_dict()
    return {u: {"user_id": u, **{f: online[f][i] for f in names}} for i, u in enumerate(users)}


def popularity(client: redis.Redis, domain: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.zrange(popularity_key(domain), 0, -1, withscores=True)}


def wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


@pytest.mark.parametrize("engine", ["python", "sql"])
def test_kill_taskmanager_mid_replay_then_exactly_once(stack: Settings, tmp_path: Path, engine: str) -> None:
    """engine: tokenize's --engine (sql: decode, validate and tokenize in the JVM, jobs/tokenize_sql.py)."""
    settings = stack
    started = time.monotonic()

    def lap(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {what}", flush=True)

    run = uuid.uuid4().hex[:8]
    raw, tokens, dlq = f"eo-{run}.raw", f"eo-{run}.tokens", f"eo-{run}.dlq"
    domain = f"eo{run}"
    ensure_topics(settings, extra=[TopicSpec(raw), TopicSpec(tokens), TopicSpec(dlq, 1)])
    ensure_feast_applied(settings)
    client = redis.Redis.from_url(settings.redis_url)

    cluster = PrivateFlinkCluster(settings, tmp_path / "flink")
    jobs: list[str] = []
    common = ["--startup", "earliest", "--parallelism", "2", "--checkpoint-interval-ms", "2000",
              "--checkpoint-dir", str(tmp_path / "flink" / "checkpoints")]
    submissions = [
        ("tokenize", [*common, "--delivery", "exactly-once", "--group-id", f"eo-{run}-tok",
                      "--source-topic", raw, "--tokens-topic", tokens, "--dlq-topic", dlq,
                      "--engine", engine]),
        # user_state checkpoints every 500 ms: with the batch fold it applies a tokenize checkpoint's worth of
        # tokens (read committed, every 2 s) faster than one 2-s interval, and the kill must land mid-replay
        # after a completed checkpoint
        ("user_state", [*common, "--checkpoint-interval-ms", "500", "--group-id", f"eo-{run}-us",
                        "--source-topic", tokens, "--dlq-topic", dlq,
                        "--max-events", str(MAX_EVENTS), "--allowed-lateness-s", str(LATENESS_S),
                        "--compact-interval-min", str(COMPACT_MIN), "--flush-ms", "200"]),
    ]

    def start_jobs() -> None:
        """Cluster up, then both `flink run` clients at once (each spends ~20 s starting)."""
        cluster.start()
        with ThreadPoolExecutor(2) as pool:
            jobs.extend(pool.map(lambda sub: cluster.submit(*sub), submissions))

    background = ThreadPoolExecutor(2)
    starting = background.submit(start_jobs)  # overlaps the publishing and the offline reference below
    try:
        events, late = make_events(run, domain)
        ordered = events + late  # the late events last, after their users' first ones
        publish(settings, ordered[:BACKLOG], raw)
        lap(f"published a backlog of {BACKLOG} events")
        # the offline reference: the same code over the same events, in publish (= per-user Kafka) order
        token_events = [tokenize_event(e) for e in events + late]
        states, late_ref = fold_events(token_events, MAX_EVENTS, LATENESS_S * 1000)
        assert {t.event_id for t in late_ref} == {e["event_id"] for e in late}
        late_ids = {t.event_id for t in late_ref}
        expected_popularity = dict(Counter(t.item_id for t in token_events if t.event_id not in late_ids))
        expected_recent = {u: s.to_feature_row() for u, s in states.items()}
        expected_long = {u: long_term_row(compact(None, s), s) for u, s in states.items()}  # = long_term_rows_from_events
        users = sorted(expected_recent)
        assert sum(1 for r in expected_long.values() if r["long_group_counts"]) > 100  # compaction has work

        starting.result()
        tokenize_jid, user_state_jid = jobs
        lap("cluster up, both jobs submitted")
        # the rest only once user_state has a completed checkpoint: the kill then lands mid-replay on a slow box
        # too (the backlog alone can be applied before the first checkpoint completes)
        wait_for("a completed user_state checkpoint", lambda: cluster.checkpoints(user_state_jid).get(
            "counts", {}).get("completed", 0) >= 1, 300, every_s=0.5)
        pacing = background.submit(publish, settings, ordered[BACKLOG:], raw, PACE_PER_S)
        total = sum(expected_popularity.values())

        # -- mid-replay: user_state has checkpointed and written part of the events, not all --
        def mid_replay() -> bool:
            for jid in jobs:  # nothing may fail before the kill
                failures = cluster.failures(jid)
                assert not failures, f"job {jid} failed before the kill:\n{failures[0]}"
            done = sum(popularity(client, domain).values())
            checkpoints = cluster.checkpoints(user_state_jid).get("counts", {}).get("completed", 0)
            assert done < total, "the replay finished before the kill; make it longer"
            return done >= total // 4 and checkpoints >= 1

        wait_for("user_state to be mid-replay", mid_replay, 300, every_s=0.5)
        before = sum(popularity(client, domain).values())
        lap("mid-replay")
        cluster.kill_taskmanager()
        print(f"\nkill -9 TaskManager at {before}/{total} applied events in Redis")
        cluster.start_taskmanager()

        # -- both jobs restore from a checkpoint (Flink's REST API says which) --
        def restored() -> dict[str, Any] | None:
            found = {}
            for jid in jobs:
                info = cluster.checkpoints(jid)
                latest = (info.get("latest") or {}).get("restored")
                if not latest or cluster.job(jid)["state"] != "RUNNING":
                    return None
                found[jid] = latest["id"]
            return found

        restored_from = wait_for("both jobs to restore from a checkpoint", restored, 180)
        lap(f"restored from checkpoints {restored_from}")
        pacing.result()
        lap(f"published all {len(ordered)} events")

        # -- the replay finishes: popularity, recent rows, long-term rows all equal the offline reference --
        wait_for("popularity to reach the offline count", lambda: popularity(client, domain) == expected_popularity
                 or sum(popularity(client, domain).values()) > total, CONVERGE_TIMEOUT_S, every_s=2)
        assert popularity(client, domain) == expected_popularity  # 0 lost, 0 applied twice
        lap("popularity equal")

        def long_rows_match() -> bool:
            return online_rows(settings, LONG_TERM_VIEW, LONG_TERM_FEATURE_NAMES, users) == expected_long

        wait_for("long-term rows to match", long_rows_match, 120, every_s=3)
        lap("long-term rows equal")
        recent = online_rows(settings, "user_recent_events", FEATURE_NAMES, users)
        differing = [u for u in users if recent[u] != expected_recent[u]]
        assert not differing, f"{len(differing)} users differ, e.g. {differing[:3]}"
        assert popularity(client, domain) == expected_popularity

        serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
        letters = [serde.decode(v).record for v in read_topic(settings, dlq)]
        late_letters = [d for d in letters if d["reason_code"] == "LATE_EVENT"]
        late_events = {tokenize_event(e).event_id for e in late}
        got_late = {serde.decode(d["original"]).record["event_id"] for d in late_letters}
        assert got_late == late_events and all(d["job"] == "user_state" for d in late_letters)
        print(f"after restore: {len(users)} users, {total} applied events, {len(late_letters)} LATE_EVENT letters: "
              f"all equal the offline reference")
    finally:
        background.shutdown(wait=True)
        for jid in jobs:
            cluster.cancel(jid)
        cluster.stop()
        client.delete(popularity_key(domain), *client.scan_iter(applied_key(domain, "*"), count=1000))
