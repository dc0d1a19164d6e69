"""feedback_join on the real stack: impressions and tokenized events through Kafka, the job on the Flink cluster,
per-arm window metrics read back from Redis and the metrics topic.

Two arms, 40 users, impressions over three 1-minute windows (attribution 2 min). The metrics equal
jobs.feedback_join_logic.offline_metrics over the same records exactly; duplicates (re-sent events and
impressions) count once; an event published after the watermark passed it is late: counted by the job, on the
DLQ as LATE_EVENT, never joined. A second, hand-written experiment (:func:`watch_traffic`) checks watch time and
completion against numbers worked out by hand. Own topics and experiment names per run, so reruns and other tests
never mix.
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
WATCH_EXPERIMENT = f"fjw-{RUN}"
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
            # durations and lengths an Avro float holds exactly, so the offline reference sees what the job sees
            duration, length = rng.choice([None, 12.5, 300.0]), rng.choice([None, 100.0, 320.0])
            events.append(Feedback(f"{RUN}-e{n}", user, rng.choice(items), action, at + delay, duration, length))
    return impressions, events


def watch_traffic() -> tuple[list[Impression], list[Feedback], dict[str, dict[str, int]]]:
    """Four users, one impression each, and what each arm's watch time and completions must sum to, by hand
    (the job's defaults: a view of >= 90 % of the item's length completes it; without a length, a RATE does)."""
    def shown(n: int, user: str, arm: str, at: int, items: tuple[str, ...]) -> Impression:
        return Impression(f"{RUN}-w{n}", user, WATCH_EXPERIMENT, arm, T0 + at, items)

    def event(n: int, user: str, item: str, action: str, at: int, duration=None, length=None) -> Feedback:
        return Feedback(f"{RUN}-we{n}", user, item, action, T0 + at, duration, length)

    impressions = [shown(1, "w1", "A", 10_000, ("m1", "m2", "m3")), shown(2, "w2", "A", 70_000, ("m1", "m4")),
                   shown(3, "w3", "B", 5_000, ("m5",)), shown(4, "w4", "B", 20_000, ("m6", "m7"))]
    events = [
        event(1, "w1", "m1", "VIEW", 20_000, 600.0, 1000.0),  # 600 s watched, 60 %: not completed
        event(2, "w1", "m2", "VIEW", 40_000, 950.0, 1000.0),  # 950 s, 95 %: completed
        event(3, "w2", "m4", "RATE", 100_000),  # no duration, no length: completed by its action
        event(4, "w3", "m5", "SKIP", 15_000, 30.0),  # a skip is not an interaction: nothing
        event(5, "w3", "m5", "VIEW", 5_000 + 3 * MIN, 1000.0, 1000.0),  # after the 2-minute attribution: nothing
        event(6, "w4", "m6", "VIEW", 35_000, 120.5),  # 120.5 s, no length and not a RATE: not completed
        event(7, "w4", "m7", "CLICK", 40_000, 46.0, 50.0),  # 46 s of 50 (>= 45): completed
    ]
    by_hand = {"A": {"impressions": 2, "clicked": 2, "watch_ms": 600_000 + 950_000, "watched": 1, "completions": 2},
               "B": {"impressions": 2, "clicked": 1, "watch_ms": 120_500 + 46_000, "watched": 1, "completions": 1}}
    return impressions, events, by_hand


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
            "sid_version": "", "duration_s": e.duration_s, "item_length_s": e.item_length_s}


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
    watch_impressions, watch_events, by_hand = watch_traffic()
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
        publisher.send(impressions + impressions[:3] + watch_impressions, events + events[:4] + watch_events)
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
        assert sum(r["watch_ms"] for r in want) > 0 and sum(r["completions"] for r in want) > 0  # exercised above
        deadline = time.monotonic() + 30
        while arm_sums(rows_from_redis(url, WATCH_EXPERIMENT)) != by_hand and time.monotonic() < deadline:
            time.sleep(0.5)
        assert arm_sums(rows_from_redis(url, WATCH_EXPERIMENT)) == by_hand
        wait_for(lambda: read_all(settings, group), 30, "the job to read phase 3")
        counts = wait_for(lambda: (c := job_counters(base, jid)).get("late_events") and c, 20, "the late event")
        assert counts["late_events"] == 1 and counts["late_impressions"] == 0 and counts["duplicates"] == 7
        assert counts["outcomes"] == len(impressions) + len(watch_impressions)
        assert counts.get("late_outcomes", 0) == 0
        # per-arm counters (labels), summed over both experiments' arms, once each when a window is emitted again
        assert counts["arm_impressions"] == len(impressions) + len(watch_impressions)
        assert counts["arm_clicked"] == sum(r["clicked"] for r in want) + sum(a["clicked"] for a in by_hand.values())
        assert counts["arm_watch_ms"] == sum(r["watch_ms"] for r in want) + sum(a["watch_ms"] for a in by_hand.values())
        hand_completions = sum(a["completions"] for a in by_hand.values())
        assert counts["arm_completions"] == sum(r["completions"] for r in want) + hand_completions
        assert dead_letter_codes(settings, AvroSerde(SchemaRegistryClient(settings.registry_url))) == ["LATE_EVENT"]
    finally:
        cancel(base, jid)
        client = redis.Redis.from_url(settings.redis_url)
        keys = [*client.scan_iter(f"ugt:exp:{EXPERIMENT}:*"), *client.scan_iter(f"ugt:exp:{WATCH_EXPERIMENT}:*")]
        if keys:
            client.delete(*keys)


def arm_sums(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per arm, the hand-checked counts summed over windows."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        arm = out.setdefault(row["arm"], dict.fromkeys(("impressions", "clicked", "watch_ms", "watched",
                                                         "completions"), 0))
        for key in arm:
            arm[key] += row[key]
    return out


def window_of(row: dict) -> tuple[str, int]:
    return row["arm"], row["window_start"]


def differences(got: list[dict], want: list[dict]) -> list[tuple]:
    """(arm, window, metric, streamed, offline) for every metric that differs; a missing window is one entry."""
    mine, theirs = {window_of(r): r for r in got}, {window_of(r): r for r in want}
    out: list[tuple] = [(*w, "window", w in mine, w in theirs) for w in sorted(set(mine) ^ set(theirs))]
    for w in sorted(set(mine) & set(theirs)):
        out += [(*w, k, mine[w].get(k), v) for k, v in theirs[w].items() if mine[w].get(k) != v]
    return out
