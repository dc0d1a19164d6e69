"""feedback_join on the real stack: impressions and tokenized events through Kafka, the job on the Flink cluster,
per-arm window metrics read back from Redis and the metrics topic.

Two arms, 40 users, impressions over three 1-minute windows (attribution 2 min). The metrics equal
jobs.feedback_join_logic.offline_metrics over the same records exactly; duplicates (re-sent events and
impressions) count once; an event published after the watermark passed it is late: counted by the job, on the
DLQ as LATE_EVENT, never joined. Own topics and experiment name per run, so reruns and other tests never mix.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import pytest
import redis
import requests
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from jobs.cli import cancel, submit
from jobs.feedback_join_logic import Feedback, Impression, JoinConfig, offline_metrics
from streams.serde import AvroSerde, SchemaRegistryClient, subject_for
from streams.topics import ensure_topics
from ugt.experiment_cli import rows_from_kafka, rows_from_redis

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
EXPERIMENT = f"fj-{RUN}"
MIN = 60_000
T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC, a window boundary
CONFIG = JoinConfig(attribution_ms=2 * MIN, metric_window_ms=MIN, ctr_ks=(1, 3))
TOPICS = {name: f"itest.fj.{name}.{RUN}" for name in ("impressions", "tokens", "metrics", "dlq")}


def traffic(seed: int = 5) -> tuple[list[Impression], list[Feedback]]:
    """Arm B's users click more; every user's clicks fall inside or just outside the window."""
    rng = random.Random(seed)
    impressions, events = [], []
    for n in range(120):
        user = f"u{n % 40}"
        arm = "B" if int(user[1:]) % 2 else "A"
        at = T0 + rng.randint(0, 3 * MIN - 1)
        items = tuple(rng.sample([str(i) for i in range(30)], 5))
        impressions.append(Impression(f"{RUN}-{n}", user, EXPERIMENT, arm, at, items))
        if rng.random() < (0.6 if arm == "B" else 0.3):
            action = "PURCHASE" if rng.random() < 0.2 else "CLICK"
            delay = rng.choice([1_000, 30_000, 2 * MIN - 1, 2 * MIN + 5_000])
            events.append(Feedback(f"{RUN}-e{n}", user, rng.choice(items), action, at + delay))
    return impressions, events


def impression_record(imp: Impression) -> dict[str, Any]:
    return {"request_id": imp.request_id, "user_id": imp.user_id, "experiment": imp.experiment, "arm": imp.arm,
            "model": "popularity-v1", "domain": "movie", "served_at": imp.served_at, "fallback": imp.fallback,
            "fallback_reason": None,
            "items": [{"item_id": item, "position": p, "score": 1.0 / (p + 1)} for p, item in enumerate(imp.items)]}


def token_record(e: Feedback) -> dict[str, Any]:
    from contracts.tokenizer import ACTION_TOKEN

    return {"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id, "event_time": e.event_time,
            "domain": "movie", "action_token": ACTION_TOKEN[e.action], "rating_token": 0, "duration_token": 0,
            "hour_token": 0, "context_tokens": [], "semantic_ids": [], "tokenizer_version": 2, "weekday_token": 4,
            "sid_version": ""}


class Publisher:
    def __init__(self, settings):
        self.serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})

    def send(self, impressions=(), events=()) -> None:
        for imp in impressions:
            value = self.serde.encode(subject_for(TOPICS["impressions"]), "impression", impression_record(imp))
            self.producer.produce(TOPICS["impressions"], value, imp.user_id.encode())
        for e in events:
            value = self.serde.encode(subject_for(TOPICS["tokens"]), "tokenized_event", token_record(e))
            self.producer.produce(TOPICS["tokens"], value, e.user_id.encode())
        assert self.producer.flush(10) == 0


def job_counters(base: str, jid: str) -> dict[str, int]:
    """Every `ugt` counter of the job, summed over vertices and subtasks."""
    out: dict[str, int] = {}
    for vertex in requests.get(f"{base}/jobs/{jid}", timeout=5).json()["vertices"]:
        url = f"{base}/jobs/{jid}/vertices/{vertex['id']}/subtasks/metrics"
        names = [m["id"] for m in requests.get(url, timeout=5).json() if ".ugt." in m["id"]]
        if names:
            for m in requests.get(url, params={"get": ",".join(names), "agg": "sum"}, timeout=5).json():
                name = m["id"].rsplit(".", 1)[1]
                out[name] = out.get(name, 0) + int(m["sum"])
    return out


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def dead_letter_codes(settings, serde: AvroSerde) -> list[str]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"fj-{RUN}",
                         "auto.offset.reset": "earliest"})
    topic = TOPICS["dlq"]
    consumer.assign([TopicPartition(topic, p, 0) for p in consumer.list_topics(topic, timeout=5).topics[topic].partitions])
    codes = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not codes:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            codes.append(serde.decode(msg.value()).record["reason_code"])
    consumer.close()
    return codes


def read_all(settings, group: str) -> bool:
    """The job's consumer group has committed (on a checkpoint) every record of both inputs."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        for topic in (TOPICS["impressions"], TOPICS["tokens"]):
            parts = [TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=5).topics[topic].partitions]
            for tp in consumer.committed(parts, timeout=5):
                if tp.offset < consumer.get_watermark_offsets(tp, timeout=5)[1]:
                    return False
        return True
    except KafkaException:  # the group's coordinator is still loading: ask again
        return False
    finally:
        consumer.close()


def join_watermark(base: str, jid: str) -> int:
    vertex = next(v for v in requests.get(f"{base}/jobs/{jid}", timeout=5).json()["vertices"]
                  if "feedback-join" in v["name"])
    marks = requests.get(f"{base}/jobs/{jid}/vertices/{vertex['id']}/watermarks", timeout=5).json()
    return min((int(m["value"]) for m in marks), default=-(2**63))


def test_feedback_join_metrics_equal_the_offline_reference(stack) -> None:
    settings = stack
    ensure_topics(settings, [TOPICS["impressions"], TOPICS["tokens"], TOPICS["metrics"]])
    ensure_topics(settings, [TOPICS["dlq"]])
    impressions, events = traffic()
    base, group = settings.flink_rest_url, f"fj-{RUN}"
    args = ["--", "--impressions-topic", TOPICS["impressions"], "--events-topic", TOPICS["tokens"],
            "--metrics-topic", TOPICS["metrics"], "--dlq-topic", TOPICS["dlq"], "--startup", "earliest",
            "--group-id", group, "--window-min", "1", "--attribution-min", "2", "--ctr-k", "1,3",
            "--out-of-orderness-s", "300", "--idle-s", "3", "--checkpoint-interval-ms", "1000", "--parallelism", "2"]
    jid = submit("feedback_join", args, detached=True)
    assert jid
    try:
        publisher = Publisher(settings)
        # phase 1: everything, plus re-sent impressions and events (duplicates); the watermark stays behind T0
        publisher.send(impressions + impressions[:3], events + events[:4])
        wait_for(lambda: read_all(settings, group), 60, "the job to read phase 1")
        # phase 2: both inputs move 20 minutes on: the watermark passes every window, which closes them
        publisher.send([Impression(f"{RUN}-m1", "z", None, None, T0 + 20 * MIN, ("0",))],
                       [Feedback(f"{RUN}-m1", "z", "0", "CLICK", T0 + 20 * MIN)])
        wait_for(lambda: join_watermark(base, jid) >= T0 + 15 * MIN - 1, 30, "the watermark")
        # phase 3: an event 10 s after T0, now behind the watermark: late
        publisher.send(events=[Feedback(f"{RUN}-late", "u1", impressions[1].items[0], "CLICK", T0 + 10_000)])
        want = offline_metrics(impressions, events, CONFIG)
        url = settings.redis_url
        # a window can be emitted twice (a join instance that was idle delivers after another emitted it): the
        # last emission is whole, so wait for the metrics to settle
        deadline = time.monotonic() + 30
        while differences(rows_from_redis(url, EXPERIMENT), want) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert differences(rows_from_redis(url, EXPERIMENT), want) == []
        assert differences(rows_from_kafka(settings.kafka_bootstrap, TOPICS["metrics"], EXPERIMENT), want) == []
        wait_for(lambda: read_all(settings, group), 30, "the job to read phase 3")
        counts = wait_for(lambda: (c := job_counters(base, jid)).get("late_events") and c, 20, "the late event")
        assert counts["late_events"] == 1 and counts["late_impressions"] == 0 and counts["duplicates"] == 7
        assert counts["outcomes"] == len(impressions)
        assert counts.get("late_outcomes", 0) == 0
        assert counts["arm_impressions"] == len(impressions)  # per-arm counters (labels), summed over both arms,
        assert counts["arm_clicked"] == sum(r["clicked"] for r in want)  # once each when a window is emitted again
        assert dead_letter_codes(settings, AvroSerde(SchemaRegistryClient(settings.registry_url))) == ["LATE_EVENT"]
    finally:
        cancel(base, jid)
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(f"ugt:exp:{EXPERIMENT}:*"))
        if keys:
            client.delete(*keys)


def window_of(row: dict) -> tuple[str, int]:
    return row["arm"], row["window_start"]


def differences(got: list[dict], want: list[dict]) -> list[tuple]:
    """(arm, window, metric, streamed, offline) for every metric that differs; a missing window is one entry."""
    mine, theirs = {window_of(r): r for r in got}, {window_of(r): r for r in want}
    out: list[tuple] = [(*w, "window", w in mine, w in theirs) for w in sorted(set(mine) ^ set(theirs))]
    for w in sorted(set(mine) & set(theirs)):
        out += [(*w, k, mine[w].get(k), v) for k, v in theirs[w].items() if mine[w].get(k) != v]
    return out
