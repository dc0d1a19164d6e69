"""The two paths bench.nearline measures on the running stack, each on its own topics, ids and keys.

  user_path   dataset events through tokenize + user_state: throughput (with the CPU profile of that window)
              and freshness (probe events -> the user's state visible in Redis)
  item_path   brand-new catalog items through item_semantic_ids -> decodable in the generator's index
Both cancel their jobs and remove their topics, lake folder and index entries at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import jvm_profile, proc_cpu

TARGET_EVENTS_PER_S = 50_000  # the target for the 2-core box (tokenize + user_state, sustained)


def stack_scope(settings: Any) -> tuple[str, ...]:
    """What marks this stack's processes on a box shared with other stacks: its var folder (Flink, Kafka, the
    registry and flink run clients name it) and its Redis port, or every node's port of the cluster profile's
    Redis Cluster (`redis-server 127.0.0.1:<port> [cluster]`); the CPU profile counts only those."""
    ports = settings.redis_cluster_ports if settings.cluster else [settings.redis_port]
    return str(settings.var_dir), *(f":{port}" for port in ports)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def applied(redis_client: Any, key: str) -> int:
    return int(sum(score for _, score in redis_client.zscan_iter(key)))


def steady(send: Any, seen: Any, count: int, rate: float, timeout_s: float) -> list[float]:
    """Send `count` probes at `rate`/s (send(i) -> key) while polling seen(keys) -> visible keys; the lags."""
    sent: dict[Any, float] = {}
    got: dict[Any, float] = {}
    interval = 1.0 / rate
    next_send = time.time()
    i = 0
    deadline = time.monotonic() + count / rate + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        now = time.time()
        if i < count and now >= next_send:
            sent[send(i)] = time.time()
            i += 1
            next_send += interval
        pending = [k for k in sent if k not in got]
        if pending:
            checked = time.time()
            for key in seen(pending):
                got[key] = checked
        time.sleep(0.005)
    if len(got) < count:
        print(f"warning: only {len(got)} of {count} probes became visible")
    return [got[k] - sent[k] for k in got]


def summary(lags: list[float]) -> dict[str, float | None]:
    return {"p50": round(statistics.median(lags), 4) if lags else None,
            "p99": round(percentile(lags, 99), 4) if lags else None,
            "max": round(max(lags), 4) if lags else None}


def cpu_budget(cpu_s_by_process: dict[str, float], events: int, cores: int, target_events_per_s: float) -> dict:
    """What each event cost every process in the throughput window (µs of CPU), against what the box has.

    At the target rate the box has cores / target seconds of CPU per event for everything on it: Kafka, Redis,
    the load generator and Flink. `max_events_per_s_if_flink_were_free` is the rate the processes outside
    Flink alone would saturate the box at, at their measured cost per event: a ceiling no job can pass here.
    """
    per_event = {name: cpu_s / events * 1e6 for name, cpu_s in cpu_s_by_process.items()}
    flink = sum(v for k, v in per_event.items() if k.startswith("flink-"))
    outside = sum(v for k, v in per_event.items() if not k.startswith("flink-"))
    return {
        "us_per_event_by_process": {k: round(v, 1) for k, v in per_event.items()},
        "flink_us_per_event": round(flink, 1),
        "outside_flink_us_per_event": round(outside, 1),
        "budget_us_per_event_at_target": round(cores * 1e6 / target_events_per_s, 1),
        "max_events_per_s_at_measured_cost": round(cores * 1e6 / (flink + outside)) if flink + outside else None,
        "max_events_per_s_if_flink_were_free": round(cores * 1e6 / outside) if outside else None,
    }


def drop_topics(settings: Any, topics: list[str]) -> None:
    """Remove this run's topics and registry subjects (best effort; the numbers are already taken)."""
    from streams.bench_anchor import _drop
    from streams.topics import admin_client

    for _ in range(3):  # right after a cancel the brokers may refuse the delete: try again a little later
        for topic in topics:
            _drop(settings, topic)
        left = set(topics) & set(admin_client(settings).list_topics(timeout=10).topics)
        if not left:
            return
        time.sleep(5)


def check_jobs(settings: Any, job_ids: list[str | None]) -> None:
    """Stop at once, with the cause, when a job of this run fails or restarts (instead of waiting it out)."""
    from jobs.cli import failure_cause

    for jid in filter(None, job_ids):
        cause = failure_cause(settings.flink_rest_url, jid)
        if cause:
            raise SystemExit(f"bench: job {jid} is {cause}")


def placement(settings: Any, job_ids: list[str | None]) -> dict[str, list[str]]:
    """job id -> the TaskManagers its tasks run on (one per job is what the stack aims for: one GIL each)."""
    import requests

    base = settings.flink_rest_url
    where: dict[str, list[str]] = {}
    try:
        for jid in filter(None, job_ids):
            tms: set[str] = set()
            for vertex in requests.get(f"{base}/jobs/{jid}", timeout=10).json().get("vertices", []):
                found = requests.get(f"{base}/jobs/{jid}/vertices/{vertex['id']}/taskmanagers", timeout=10).json()
                tms.update(tm.get("taskmanager-id", tm.get("host", "?")) for tm in found.get("taskmanagers", []))
            where[jid] = sorted(tms)
    except (requests.RequestException, ValueError, KeyError) as exc:  # an extra, not worth losing the run for
        print(f"bench: could not read where the jobs ran ({exc.__class__.__name__}: {exc})")
    return where


@dataclass
class UserRun:
    """One run of the user path: its topics, domain, jobs, and the clients that feed and watch them."""

    args: argparse.Namespace
    settings: Any
    run_id: str
    redis: Any
    raw: str
    tokens: str
    dlq: str
    domain: str
    pop_key: str  # the domain's popularity zset: its scores add up to the events applied
    lake: Path
    delivery: str = "at-least-once"  # both jobs' --delivery (exactly-once: its own checkpoint interval too)
    job_ids: list[str | None] = field(default_factory=list)

    def applied(self) -> int:
        return applied(self.redis, self.pop_key)

    def wait_applied(self, target: int, timeout_s: float, failure: str) -> None:
        """Until ``target`` events are applied in Redis, stopping at once if a job of this run fails."""
        deadline = time.monotonic() + timeout_s
        while self.applied() < target:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {failure}")
            check_jobs(self.settings, self.job_ids)
            time.sleep(0.5)


def submit_user_jobs(run: UserRun) -> None:
    """tokenize + user_state on this run's topics, group ids and lake folder."""
    from jobs.cli import submit

    args = run.args
    lake_args = [] if "--lake" in args.tokenize_args else ["--lake", str(run.lake)]
    print(f"== submitting tokenize + user_state (run {run.run_id}, {run.delivery})")
    common = ["--startup", "earliest", "--parallelism", str(args.parallelism), "--execution-mode", args.execution_mode,
              "--delivery", run.delivery]
    if run.delivery == "exactly-once":
        common += shlex.split(args.exactly_once_args)
    run.job_ids = [
        submit("tokenize", ["--source-topic", run.raw, "--tokens-topic", run.tokens, "--dlq-topic", run.dlq,
                            "--group-id", f"bench-{run.run_id}-tokenize", *common, *lake_args,
                            *shlex.split(args.tokenize_args)],
               detached=True),
        submit("user_state", ["--source-topic", run.tokens, "--dlq-topic", run.dlq,
                              "--group-id", f"bench-{run.run_id}-user-state", *common,
                              *shlex.split(args.user_state_args)], detached=True),
    ]


def run_events(run: UserRun) -> list[dict[str, Any]]:
    """The dataset's first --events events as this run's users, in this run's domain."""
    from contracts.datasets import load_dataset, user_events

    events = []
    for event in user_events(load_dataset(run.args.dataset), limit=run.args.events):
        event["user_id"] = f"{run.run_id}-{event['user_id']}"
        event["event_id"] = f"{run.run_id}-{event['event_id']}"
        event["domain"] = run.domain
        events.append(event)
    return events


def warm_up_jobs(run: UserRun, publisher: Any, events: list[dict[str, Any]]) -> int:
    """One event, then --warmup-events (other user ids) through both jobs, untimed; the events applied so far."""
    args = run.args
    warm = dict(events[0], event_id=f"{run.run_id}-warmup", user_id=f"{run.run_id}-warmup")
    publisher.publish(run.raw, "user_event", warm, warm["user_id"])
    publisher.flush(60)
    run.wait_applied(1, 300, "the jobs applied nothing within 300 s; see `ugt jobs list` and var/log/flink")
    if args.warmup_events <= 0:
        return 1
    print(f"== warm-up: {args.warmup_events:,} events (other user ids), not timed")
    for event in events[: args.warmup_events]:
        user = f"{event['user_id']}-warm"
        publisher.publish(run.raw, "user_event", dict(event, event_id=f"{event['event_id']}-warm", user_id=user), user)
    publisher.flush(300)
    base = 1 + min(args.warmup_events, len(events))
    run.wait_applied(base, args.timeout_s, f"the warm-up was not applied within {args.timeout_s:.0f} s")
    return base


def throughput_window(run: UserRun, publisher: Any, events: list[dict[str, Any]], base: int) -> dict[str, Any]:
    """All events at full speed until the last is applied in Redis, with the CPU profile of that window."""
    args = run.args
    print(f"== throughput: {len(events):,} {args.dataset} events at full speed")
    scope = stack_scope(run.settings)
    cpu_before = proc_cpu.snapshot(os.getpid(), scope)
    # the samplers watch every TaskManager: each embeds its own CPython (py-spy) beside its Java (JFR)
    taskmanagers = ([p.pid for p in proc_cpu.processes_running("TaskManagerRunner", scope)]
                    if args.py_spy or args.jfr else [])
    spies = []
    for pid in taskmanagers if args.py_spy else []:
        out = f"/tmp/ugt-bench-{run.run_id}-py-spy-{pid}.txt"
        spies.append((proc_cpu.start_py_spy(args.py_spy, pid, out), out))
    recordings = [(pid, f"/tmp/ugt-bench-{run.run_id}-{pid}-{time.time():.0f}.jfr")  # one per window
                  for pid in (taskmanagers if args.jfr else [])]
    for recording in recordings:
        jvm_profile.start(*recording)
    start = time.time()
    for event in events:
        publisher.publish(run.raw, "user_event", event, event["user_id"])
    publisher.flush(300)
    produced_s = time.time() - start
    deadline = time.monotonic() + args.timeout_s
    while (done := run.applied()) < len(events) + base:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {done - base:,} of {len(events):,} applied after {args.timeout_s:.0f} s")
        time.sleep(0.2)
    throughput_s = time.time() - start
    cpu = proc_cpu.diff(cpu_before, proc_cpu.snapshot(os.getpid(), scope))
    cpu["budget"] = cpu_budget(cpu["cpu_s_by_process"], len(events), os.cpu_count() or 1, TARGET_EVENTS_PER_S)
    flink_jit_s = sum(v for k, v in cpu["cpu_s_jit_compiler"].items() if k.startswith("flink-"))
    cpu["budget"]["flink_jit_us_per_event"] = round(flink_jit_s / len(events) * 1e6, 1)
    cpu["taskmanagers_by_job"] = placement(run.settings, run.job_ids)
    if len({tuple(tms) for tms in cpu["taskmanagers_by_job"].values()}) < len(cpu["taskmanagers_by_job"]):
        print("bench: warning: tokenize and user_state ran in the same TaskManager (one GIL for both)")
    if spies:
        cpu["python_profile"] = proc_cpu.stop_py_spies(spies)
    if recordings:
        cpu["java_profile"] = jvm_profile.stop(recordings)
    return {"events": len(events), "produce_s": round(produced_s, 2), "throughput_s": round(throughput_s, 2),
            "events_per_s": round(len(events) / throughput_s, 1), "cpu": cpu}


def later_windows(run: UserRun, publisher: Any, events: list[dict[str, Any]], base: int,
                  first: dict[str, Any]) -> dict[str, Any]:
    """--windows - 1 more throughput windows right after the first, each with the same events as new users and
    event ids: the jobs' JIT and caches warmer each time. The last is the steady-state figure (`steady`); the
    first stays the headline, as before."""
    windows = [first]
    for i in range(1, run.args.windows):
        again = [dict(e, user_id=f"{e['user_id']}-w{i}", event_id=f"{e['event_id']}-w{i}") for e in events]
        windows.append(throughput_window(run, publisher, again, base + i * len(events)))
    return {"steady": windows[-1], "windows": [
        {"events_per_s": w["events_per_s"], "flink_us_per_event": w["cpu"]["budget"]["flink_us_per_event"],
         "flink_jit_us_per_event": w["cpu"]["budget"]["flink_jit_us_per_event"],
         "cpu_s_by_thread": w["cpu"]["cpu_s_by_thread"],
         **({"java_profile": w["cpu"]["java_profile"]} if "java_profile" in w["cpu"] else {})} for w in windows]}


def freshness_lags(run: UserRun, publisher: Any, events: list[dict[str, Any]]) -> list[float]:
    """Probe events (new users) at --probe-rate: produced -> the user's state visible in Redis, in seconds."""
    from infra.feast_store import FeastRedisLayout

    args = run.args
    layout = FeastRedisLayout.from_repo(run.settings.feature_repo)
    print(f"== freshness: {args.probes} probe events at {args.probe_rate}/s")
    probe_base = events[-1]["event_time"]

    def send(i: int) -> bytes:
        user = f"{run.run_id}-probe-{i}"
        probe = dict(events[i % len(events)], event_id=f"{run.run_id}-probe-{i}", user_id=user,
                     event_time=probe_base + i)
        publisher.publish(run.raw, "user_event", probe, user)
        publisher.poll(0)
        return layout.entity_key("user_id", user)

    def seen(keys: list[bytes]) -> list[bytes]:
        pipe = run.redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [k for k, e in zip(keys, pipe.execute(), strict=True) if e]

    lags = steady(send, seen, args.probes, args.probe_rate, 120)
    publisher.flush(30)
    return lags


def checkpoint_stats(settings: Any, job_ids: list[str | None]) -> dict[str, Any]:
    """Per job: checkpoints completed and their end-to-end duration (Flink's REST summary), what a short interval
    costs and how long a transactional commit waits beyond the interval."""
    import requests

    stats: dict[str, Any] = {}
    for jid in filter(None, job_ids):
        try:
            info = requests.get(f"{settings.flink_rest_url}/jobs/{jid}/checkpoints", timeout=10).json()
            duration = info.get("summary", {}).get("end_to_end_duration", {})
            stats[jid] = {"completed": info.get("counts", {}).get("completed"),
                          "failed": info.get("counts", {}).get("failed"),
                          "duration_ms": {k: duration.get(k) for k in ("avg", "p50", "p99", "max")}}
        except (requests.RequestException, ValueError) as exc:  # an extra, not worth losing the run for
            stats[jid] = {"error": f"{exc.__class__.__name__}: {exc}"}
    return stats


def user_path(args: argparse.Namespace, settings: Any, run_id: str, r: Any,
              delivery: str = "at-least-once") -> dict[str, Any]:
    """tokenize + user_state with `delivery`: throughput (with the CPU profile of that window) and freshness."""
    from contracts.redis_keys import popularity_key
    from jobs.cli import cancel
    from streams.producer import EventPublisher
    from streams.topics import TopicSpec, ensure_topics

    # the run's own lake folder, removed at the end: bench users must not land in the lake training reads
    run = UserRun(args, settings, run_id, r, raw=f"bench.{run_id}.events.raw", tokens=f"bench.{run_id}.events.tokens",
                  dlq=f"bench.{run_id}.events.dlq", domain=f"bench-{run_id}", pop_key=popularity_key(f"bench-{run_id}"),
                  lake=settings.var_dir / "bench" / f"lake-{run_id}", delivery=delivery)
    ensure_topics(settings, extra=[TopicSpec(run.raw), TopicSpec(run.tokens), TopicSpec(run.dlq, 1)])
    submit_user_jobs(run)
    try:
        events = run_events(run)
        publisher = EventPublisher(settings)
        publisher.encode(run.raw, "user_event", events[0])  # schema registered before the clock starts
        # warm-up: start-up is not counted as throughput
        base = warm_up_jobs(run, publisher, events)
        result = throughput_window(run, publisher, events, base)
        if args.windows > 1:
            result.update(later_windows(run, publisher, events, base, result))
        lags = freshness_lags(run, publisher, events)
        result["checkpoints"] = checkpoint_stats(settings, run.job_ids)
    finally:
        for jid in run.job_ids:  # only this run's jobs: the demo's may be running beside them
            if jid:
                cancel(settings.flink_rest_url, jid)
        drop_topics(settings, [run.raw, run.tokens, run.dlq])
        shutil.rmtree(run.lake, ignore_errors=True)
    return {**result, "delivery": delivery, "freshness": summary(lags), "freshness_probes": len(lags)}


def item_path(args: argparse.Namespace, settings: Any, run_id: str, r: Any) -> dict[str, Any]:
    """item_semantic_ids: brand-new items at a steady rate -> decodable in the index (after a warm-up item)."""
    from contracts.redis_keys import ARTIFACTS_KEY, dedup_namespace, index_key, item_key
    from jobs.cli import cancel, submit
    from jobs.item_semantic_ids_job import check_artifact
    from jobs.item_semantic_ids_logic import artifact_version
    from streams.producer import EventPublisher
    from streams.topics import TopicSpec, ensure_topics

    artifact = check_artifact(args.artifact)
    version = artifact_version(artifact)
    had_registration = r.hexists(ARTIFACTS_KEY, version)
    items_topic, dlq = f"bench.{run_id}.items", f"bench.{run_id}.items.dlq"
    active_key = f"bench:{run_id}:sid:active"  # its own pointer: never moves the stack's ugt:sid:active
    ensure_topics(settings, extra=[TopicSpec(items_topic, 2), TopicSpec(dlq, 1)])
    print(f"== submitting item_semantic_ids (artifact {version})")
    jid = submit("item_semantic_ids", ["--artifact", artifact, "--source-topic", items_topic, "--dlq-topic", dlq,
                                       "--group-id", f"bench-{run_id}-items", "--startup", "earliest",
                                       "--parallelism", str(args.parallelism), "--flush-ms", str(args.item_flush_ms),
                                       "--active-key", active_key, "--execution-mode", args.execution_mode],
                 detached=True)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation"]
    ids: list[str] = []

    def record(i: int) -> dict[str, Any]:
        return {"item_id": f"bench-{run_id}-item-{i}", "domain": "movie", "description": "",
                "title": f"Brand New Film {i} of Night {run_id}", "categories": [genres[i % 8], genres[(i * 3) % 8]],
                "attributes": {"year": str(1990 + i % 30)}, "updated_at": int(time.time() * 1000)}

    publisher = EventPublisher(settings)
    try:
        def send(i: int) -> str:
            rec = record(i)
            publisher.publish_item_event(rec, topic=items_topic)
            publisher.poll(0)
            ids.append(rec["item_id"])
            return rec["item_id"]

        def seen(keys: list[str]) -> list[str]:
            return [k for k, c in zip(keys, r.hmget(item_key(version), keys), strict=True) if c is not None]

        # warm-up: the first item pays for the job's start and the text encoder's first load
        warm = steady(lambda i: send(args.new_items + 1000), seen, 1, 1.0, 300)
        if not warm:
            check_jobs(settings, [jid])
            raise SystemExit("bench: item_semantic_ids indexed nothing within 300 s; see var/log/flink")
        print(f"== new items: {args.new_items} at {args.item_rate}/s (warm-up item: {warm[0]:.1f} s)")
        lags = steady(send, seen, args.new_items, args.item_rate, 120)
        publisher.flush(30)
    finally:
        if jid:
            cancel(settings.flink_rest_url, jid)
        time.sleep(2)  # let the cancelled job's last batch land before removing this run's items
        codes = r.hmget(item_key(version), ids) if ids else []
        pipe = r.pipeline(transaction=False)
        for item_id, code in zip(ids, codes, strict=True):
            pipe.hdel(item_key(version), item_id)
            if code is not None:
                pipe.hdel(index_key(version), code)
                prefix = code.decode().rsplit("-", 1)[0]
                pipe.hdel(f"{dedup_namespace(version)}:{{{prefix}}}", item_id)
        pipe.delete(active_key)
        if not had_registration:
            pipe.hdel(ARTIFACTS_KEY, version)
        pipe.execute()
        drop_topics(settings, [items_topic, dlq])
    return {"new_items": len(lags), "item_rate_per_s": args.item_rate, "artifact_version": version,
            "artifact": str(Path(artifact)), "warmup_item_s": round(warm[0], 3), "new_item": summary(lags)}
