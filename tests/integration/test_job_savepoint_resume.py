"""Stop user_state with a savepoint, resume it: no state lost, nothing applied twice (how a job is upgraded).

On the real stack (Kafka, Schema Registry, Redis, Feast, the shared Flink cluster): of the first 6,000 ML-1M
events (as TokenizedEvents, keyed by user), each user's earlier half goes through user_state; `ugt jobs stop`
takes a savepoint and ends the job; each user's later half arrives while it is down; `ugt jobs submit
--from-savepoint` starts it again at twice the parallelism (rescaled) with the default `--startup group`. Flink's REST API must say it restored that savepoint, and at the end every user's
`user_recent_events` and `user_long_term` rows and the popularity ZSET must equal what the same code computes
offline from all 6,000 events. A job that lost its keyed state would rebuild every user from its later half only
(and the popularity bookkeeping would skip those events), so the comparison fails unless the state came back
(checked: resubmitted without the savepoint, the test fails).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient
from test_user_state_exactly_once import ensure_feast_applied, online_rows, popularity, wait_for

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
from infra.settings import Settings
from jobs import cli as jobs_cli
from streams.producer import EventPublisher
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 6_000
MAX_EVENTS = 50  # a small window, so users spill into the long-term history
COMPACT_MIN = 0.05  # 3 s


def committed(settings: Settings, group: str) -> int:
    """Records before the consumer group's committed offsets, over all partitions."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    return sum(max(tp.offset, 0) for f in futures.values() for tp in f.result().topic_partitions)


def test_stop_with_savepoint_then_resume_keeps_the_state(stack: Settings, tmp_path: Path) -> None:
    settings = stack
    base = settings.flink_rest_url.rstrip("/")
    run = uuid.uuid4().hex[:8]
    tokens, dlq = f"sp-{run}.tokens", f"sp-{run}.dlq"
    domain = f"sp{run}"
    ensure_topics(settings, extra=[TopicSpec(tokens), TopicSpec(dlq, 1)])
    ensure_feast_applied(settings)
    client = redis.Redis.from_url(settings.redis_url)
    events = [tokenize_event({**e, "user_id": f"sp{run}-{e['user_id']}", "event_id": f"sp{run}-{e['event_id']}",
                              "domain": domain})
              for e in user_events(load_dataset("ml-1m"), limit=N_EVENTS)]
    # every user's earlier half of events first, its later half while the job is down: each user spans the stop
    per_user, seen = Counter(t.user_id for t in events), Counter()
    first, second = [], []
    for t in events:
        (first if seen[t.user_id] < per_user[t.user_id] // 2 else second).append(t)
        seen[t.user_id] += 1
    events = first + second  # publish order = per-user order
    group = f"sp-{run}-us"
    args = ["--", "--group-id", group, "--source-topic", tokens, "--dlq-topic", dlq,
            "--checkpoint-interval-ms", "2000", "--checkpoint-dir", str(tmp_path / "checkpoints"),
            "--max-events", str(MAX_EVENTS), "--compact-interval-min", str(COMPACT_MIN), "--flush-ms", "200"]

    def publish(batch) -> None:
        with EventPublisher(settings) as publisher:
            for t in batch:
                publisher.publish(tokens, "tokenized_event", t.to_record(), t.user_id)

    def applied() -> int:
        return sum(popularity(client, domain).values())

    jids: list[str] = []
    try:
        publish(first)
        jids.append(jobs_cli.submit("user_state", args, detached=True))
        wait_for("the first half to be applied", lambda: applied() >= len(first), 300)
        assert applied() == len(first)
        # Flink commits the group's offsets on checkpoints: wait until they cover the first half, so that a new job
        # without the savepoint would start right after it with empty state (the negative control fails then),
        # not replay the topic from the start and rebuild every user from scratch
        wait_for("the group's offsets to cover the first half", lambda: committed(settings, group) == len(first), 120)

        stopped = jobs_cli.stop_with_savepoint(base, jids[0], target_dir=str(tmp_path / "savepoints"))
        assert [jid for jid, _ in stopped] == [jids[0]]
        location = stopped[0][1]
        assert jobs_cli.savepoint_exists(location), location
        wait_for("the stopped job to finish", lambda: jobs_cli._get(f"{base}/jobs/{jids[0]}")["state"] == "FINISHED", 60)

        publish(second)  # arrives while the job is down
        time.sleep(1)
        assert applied() == len(first)
        # resumed at twice the parallelism: Flink redistributes the keyed state by key group (rescaling)
        jids.append(jobs_cli.submit("user_state", [*args, "--parallelism", "2"], detached=True, savepoint=location))
        restored = wait_for("the job to restore the savepoint", lambda: (jobs_cli._get(
            f"{base}/jobs/{jids[1]}/checkpoints").get("latest") or {}).get("restored"), 120)
        assert restored["is_savepoint"] and restored["external_path"].rstrip("/") == location.rstrip("/")

        states, late = fold_events(events, MAX_EVENTS, 86_400_000)
        assert not late
        expected_popularity = dict(Counter(t.item_id for t in events))
        wait_for("popularity over both halves", lambda: applied() >= len(events), 300)
        assert popularity(client, domain) == expected_popularity  # 0 lost, 0 applied twice
        users = sorted(states)
        expected_recent = {u: s.to_feature_row() for u, s in states.items()}
        expected_long = {u: long_term_row(compact(None, s), s) for u, s in states.items()}
        assert sum(1 for r in expected_long.values() if r["long_group_counts"]) > 5  # compaction has work
        wait_for("recent rows over both halves", lambda: online_rows(
            settings, "user_recent_events", FEATURE_NAMES, users) == expected_recent, 60, every_s=2)
        wait_for("long-term rows over both halves", lambda: online_rows(
            settings, LONG_TERM_VIEW, LONG_TERM_FEATURE_NAMES, users) == expected_long, 120, every_s=3)
        print(f"\nsavepoint {location}: {len(users)} users, {len(events)} events, state equal to the offline reference")
    finally:
        for jid in jids:
            try:
                jobs_cli.cancel(base, jid)
            except jobs_cli.JobsError:
                pass  # already finished
        client.delete(popularity_key(domain), *client.scan_iter(applied_key(domain, "*"), count=1000))
