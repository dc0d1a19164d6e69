"""The feedback_join job's own costs for bench/ab_sim.py: click-to-metric delay and throughput per core.

Delay: while the simulated traffic runs, a thread polls Redis for the experiment's window rows and notes when each
(arm, window) first appears; a click's delay is that moment minus the click's event time, for the window of the
impression it followed. A window's row is written once the watermark passes window end + attribution
(jobs/feedback_join_logic.ArmAggregator.emit_at), and the watermark trails the newest event time by the allowed
out-of-orderness, so the delay is bounded below by (window end - click) + attribution + out-of-orderness: the
measured p99 is that bound plus what the pipeline (tokenize, Kafka, the join, Redis) adds.

Throughput: a second feedback_join job (parallelism 1) on fresh topics, a backlog of synthetic impressions and
clicks produced at once; the job's TaskManager CPU seconds (this stack's TaskManagers, read with psutil) over the
drain, until the metrics in Redis count every impression.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from bench import proc_cpu


class MetricsWatcher:
    """Polls Redis for an experiment's window rows; ``first_seen[(arm, window_start)]`` is wall ms."""

    def __init__(self, settings: Any, experiment: str, every_s: float = 0.25):
        import redis

        self.client = redis.Redis.from_url(settings.redis_url)
        self.experiment = experiment
        self.first_seen: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        from jobs.feedback_join_logic import metrics_from_redis

        while not self._stop.wait(every_s):
            now = int(time.time() * 1000)
            for row in metrics_from_redis(self.client, self.experiment):
                self.first_seen.setdefault((row["arm"], int(row["window_start"])), now)

    def stop(self) -> dict[tuple[str, int], int]:
        self._stop.set()
        self._thread.join()
        return self.first_seen


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def click_delays(clicks: list[tuple[str, int, int]], first_seen: dict[tuple[str, int], int], window_ms: int,
                 closed_at_ms: int) -> dict[str, Any]:
    """Seconds from each click (arm, impression window start, click event ms) to its window's row in Redis; windows
    that appeared only after ``closed_at_ms`` (closed by the bench's flush, not by live traffic) are left out."""
    delays, flushed, missing = [], 0, 0
    for arm, window_start, clicked_at in clicks:
        seen = first_seen.get((arm, window_start))
        if seen is None:
            missing += 1
        elif seen >= closed_at_ms:
            flushed += 1
        else:
            delays.append((seen - clicked_at) / 1000)
    summary: dict[str, Any] = {"clicks_measured": len(delays), "clicks_in_flushed_windows": flushed,
                               "clicks_window_never_seen": missing, "window_s": window_ms / 1000}
    if delays:
        summary.update({f"p{int(q * 100)}_s": round(percentile(delays, q), 2) for q in (0.5, 0.9, 0.99)})
        summary.update({"min_s": round(min(delays), 2), "max_s": round(max(delays), 2)})
    return summary


def stack_taskmanagers(settings: Any) -> list[Any]:
    """This stack's TaskManager processes (their command line names our var dir; other stacks share the box)."""
    var = str(settings.var_dir)
    found = proc_cpu.processes_running("TaskManagerRunner")
    return [p for p in found if any(var in part for part in (p.info["cmdline"] or []))]


def synthetic_backlog(run: str, impressions: int, seed: int) -> tuple[list[dict], list[dict], str]:
    """Impressions (2 arms, 1,000 users, 10 items) spread over 5 s of event time (inside the job's 10 s
    out-of-orderness: the source reads its partitions unevenly, and a backlog spread wider turns late), ~10 %
    clicked 1 s later."""
    from contracts.tokenizer import ACTION_TOKEN

    rng = random.Random(seed)
    experiment = f"fjbench-{run}"
    start = int(time.time() * 1000) - 60_000
    imps, events = [], []
    for n in range(impressions):
        user, at = f"fjb-{run}-u{n % 1000}", start + n * 5000 // impressions
        items = [str(i) for i in rng.sample(range(1000), 10)]
        imps.append({"request_id": f"{run}-{n}", "user_id": user, "experiment": experiment, "arm": "ab"[n % 2],
                     "model": "popularity-v1", "domain": "movie", "served_at": at, "fallback": False,
                     "fallback_reason": None,
                     "items": [{"item_id": it, "position": p, "score": 1.0 / (p + 1)} for p, it in enumerate(items)]})
        if rng.random() < 0.1:
            events.append({"event_id": f"{run}-e{n}", "user_id": user, "item_id": rng.choice(items),
                           "event_time": at + 1000, "domain": "movie", "action_token": ACTION_TOKEN["CLICK"],
                           "rating_token": 0, "duration_token": 0, "hour_token": 0, "context_tokens": [],
                           "semantic_ids": [], "tokenizer_version": 2, "weekday_token": 4, "sid_version": ""})
    return imps, events, experiment


def join_read_records(settings: Any, jid: str) -> int:
    """Records into the job's feedback-join operator so far (Flink's REST metrics, refreshed every ~10 s)."""
    import requests

    vertices = requests.get(f"{settings.flink_rest_url}/jobs/{jid}", timeout=5).json()["vertices"]
    return sum(int(v["metrics"]["read-records"]) for v in vertices if v["name"].startswith("feedback-join"))


def encode_backlog(settings: Any, topics: dict[str, str], imps: list[dict], events: list[dict]) -> list[tuple]:
    from streams.serde import AvroSerde, SchemaRegistryClient, subject_for

    serde = AvroSerde(SchemaRegistryClient(settings.registry_url))
    return [(topics[topic], serde.encode(subject_for(topics[topic]), schema, r), r["user_id"])
            for topic, schema, records in (("impressions", "impression", imps), ("tokens", "tokenized_event", events))
            for r in records]


def produce(settings: Any, encoded: list[tuple]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20})
    for topic, value, key in encoded:
        producer.produce(topic, value, key.encode())
        producer.poll(0)
    producer.flush(60)


def taskmanager_cpu(managers: list[Any]) -> float:
    return sum(proc_cpu.cpu_seconds(p) for p in managers)


def join_throughput(settings: Any, run: str, impressions: int, seed: int, wait_running: Any,
                    timeout_s: float = 600.0) -> dict[str, Any]:
    """Drain a backlog through a fresh feedback_join job: impressions per TaskManager CPU-second (less the idle
    TaskManagers' rate) and per wall second; then close the windows and check Redis counts every impression."""
    import redis

    from jobs.cli import cancel, submit
    from jobs.feedback_join_logic import metrics_from_redis
    from streams.topics import ensure_topics

    topics = {name: f"absim.fj.{name}.{run}" for name in ("impressions", "tokens", "metrics", "dlq")}
    ensure_topics(settings, list(topics.values()))
    imps, events, experiment = synthetic_backlog(run, impressions, seed)
    encoded = encode_backlog(settings, topics, imps, events)
    later = int(time.time() * 1000) + 3_600_000  # sent after the drain: closes every window
    closing = encode_backlog(settings, topics, [dict(imps[0], request_id=f"{run}-close", user_id="fjb-close",
                                                     experiment=None, arm=None, items=[], served_at=later)],
                             [dict(events[0], event_id=f"{run}-close", user_id="fjb-close", event_time=later)])
    jid = submit("feedback_join", ["--", "--impressions-topic", topics["impressions"], "--events-topic",
                                   topics["tokens"], "--metrics-topic", topics["metrics"], "--dlq-topic",
                                   topics["dlq"], "--startup", "earliest", "--group-id", f"absim-fjb-{run}",
                                   "--window-min", "1", "--attribution-min", "1", "--out-of-orderness-s", "10",
                                   "--idle-s", "10", "--checkpoint-interval-ms", "5000", "--parallelism", "1"],
                 detached=True)
    try:
        wait_running(settings, [jid])
        managers = stack_taskmanagers(settings)
        idle_from, idle_cpu = time.monotonic(), taskmanager_cpu(managers)
        time.sleep(10.0)
        idle_rate = (taskmanager_cpu(managers) - idle_cpu) / (time.monotonic() - idle_from)
        cpu_before, started = taskmanager_cpu(managers), time.monotonic()
        produce(settings, encoded)
        total, deadline, seen, still_since = len(imps) + len(events), time.monotonic() + timeout_s, -1, 0.0
        while seen < total and time.monotonic() < deadline:  # or unchanged for 25 s: it counts differently
            time.sleep(0.5)
            now_seen = join_read_records(settings, jid)
            if now_seen != seen:
                seen, still_since = now_seen, time.monotonic()
            elif seen > 0 and time.monotonic() - still_since > 25:
                break
        wall_s, cpu_s = time.monotonic() - started, taskmanager_cpu(managers) - cpu_before
        produce(settings, closing)
        client, counted, settled = redis.Redis.from_url(settings.redis_url), 0, time.monotonic() + 60
        while counted < impressions and time.monotonic() < min(deadline, settled):
            time.sleep(1.0)
            counted = sum(r["impressions"] for r in metrics_from_redis(client, experiment))
    finally:
        cancel(settings.flink_rest_url, jid)
    net_s = cpu_s - idle_rate * wall_s
    return {"impressions": impressions, "clicks": len(events), "impressions_counted_in_redis": counted,
            "taskmanager_cpu_s": round(cpu_s, 2), "idle_taskmanager_cores": round(idle_rate, 3),
            "join_cpu_s": round(net_s, 2), "join_read_records": seen, "wall_s": round(wall_s, 1),
            "impressions_per_core_s": round(impressions / net_s, 1) if net_s > 0 else None,
            "impressions_per_wall_s": round(impressions / wall_s, 1), "taskmanagers": len(managers),
            "wall_ends": "when Flink's REST read-records (refreshed ~10 s) reach the backlog: an upper bound"}
