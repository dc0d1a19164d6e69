"""The nearline layer on the running stack: throughput, freshness and new-item delay, with the Kafka anchor.

Measures, in one run on one box (the shared standalone Flink cluster, Kafka, Redis):
  kafka_raw_events_per_s   the anchor: the same Avro user events produced + consumed back, no Flink
  events_per_s      dataset events replayed at full speed through tokenize + user_state:
                    events / (first produce -> last event applied in Redis); job start-up not counted, and
                    --warmup-events (other users) go through first, so the TaskManagers' JIT and caches are
                    as warm as in a job that has been running
  freshness_p50_s   probe events at a steady rate: produced -> the user's state visible in Redis
  freshness_p99_s
  new_item_p50_s    brand-new catalog items at a steady rate through item_semantic_ids (the artifact of
  new_item_p99_s    --artifact): produced -> its code in the generator's decode index (ugt:sid:item:<version>)
  cpu               who ate the CPU during the throughput window (bench.proc_cpu: per process, per thread)

Every run uses its own topics, consumer groups, user-id prefix, domain, item ids, active-version key and lake
folder (var/bench/lake-<run>), so it never mixes with the demo's or the tests' data; its jobs are cancelled, its
lake folder deleted and its new items removed from the index at the end. Needs the stack (`ugt stack up`; the script brings it up if it is down) and, for the item phase, a
semantic-ID artifact (`ugt semantic-ids build --dataset ml-1m --config models/configs/semantic_ids_ml1m.yaml
--out runs/sid/ml1m`; or --new-items 0 to skip).

    python -m bench.nearline                                  # full run -> bench/results/nearline.json
    python -m bench.nearline --events 20000 --warmup-events 0 --probes 50 --new-items 20 --anchor-events 20000 \
        --name nearline-quick
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result

TARGET_EVENTS_PER_S = 50_000  # the target for the 2-core box (tokenize + user_state, sustained)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.nearline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m", choices=("ml-1m", "ml-100k"))
    parser.add_argument("--events", type=int, default=200_000,
                        help="dataset events to replay; 0 skips the user path (default: %(default)s)")
    parser.add_argument("--warmup-events", type=int, default=50_000,
                        help="dataset events replayed through both jobs (other user ids) before the throughput "
                        "window, so a fresh TaskManager's JIT and caches are warm, as in a job that has been "
                        "running (default: %(default)s)")
    parser.add_argument("--probes", type=int, default=300, help="freshness probe events (default: %(default)s)")
    parser.add_argument("--probe-rate", type=float, default=20.0, help="probe events per second (default: %(default)s)")
    parser.add_argument("--anchor-events", type=int, default=100_000,
                        help="events for the raw-Kafka anchor (default: %(default)s)")
    parser.add_argument("--parallelism", type=int, default=1, help="Flink parallelism of the jobs (default: %(default)s)")
    parser.add_argument("--new-items", type=int, default=100,
                        help="new catalog items for new_item_p99_s; 0 skips the item phase (default: %(default)s)")
    parser.add_argument("--item-rate", type=float, default=5.0, help="new items per second (default: %(default)s)")
    parser.add_argument("--artifact", default="runs/sid/ml1m", help="semantic-ID artifact (default: %(default)s)")
    parser.add_argument("--item-flush-ms", type=int, default=50,
                        help="item_semantic_ids --flush-ms: the batching delay a new item waits at most "
                        "(default: %(default)s)")
    parser.add_argument("--execution-mode", choices=("thread", "process"), default="thread",
                        help="PyFlink execution mode of every job: thread (one interpreter in the TaskManager, shared "
                        "by all jobs) or process (fresh Python workers per job) (default: %(default)s)")
    parser.add_argument("--tokenize-args", default="",
                        help="extra tokenize job options, one string (e.g. \"--lake ''\" for no parquet lake)")
    parser.add_argument("--user-state-args", default="", help="extra user_state job options, one string")
    parser.add_argument("--py-spy", default=None,
                        help="path of a py-spy binary: sample the TaskManager's Python stacks during the throughput "
                        "window (where inside the Python operators the time goes)")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--name", default="nearline", help="result file bench/results/<name>.json")
    return parser.parse_args(argv)


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


def stale_code_warning() -> str | None:
    """In thread mode the TaskManager's embedded CPython keeps modules imported by earlier jobs: if the TM started
    before the job code last changed, a new job may run the old code. Says so (the result records it)."""
    import psutil

    from infra.settings import REPO_ROOT

    started = [p.create_time() for p in psutil.process_iter(["cmdline"])
               if any("TaskManagerRunner" in part for part in (p.info["cmdline"] or []))]
    if not started:
        return None
    files = [f for folder in ("jobs", "models", "streams") for f in (REPO_ROOT / folder).rglob("*.py")]
    newest = max(files, key=lambda f: f.stat().st_mtime)
    if newest.stat().st_mtime <= min(started):
        return None
    return (f"the TaskManager started {time.ctime(min(started))}, before {newest.relative_to(REPO_ROOT)} changed "
            f"({time.ctime(newest.stat().st_mtime)}): thread-mode jobs may run modules an earlier job imported")


def user_path(args: argparse.Namespace, settings: Any, run_id: str, r: Any) -> dict[str, Any]:
    """tokenize + user_state: throughput (with the CPU profile of that window) and freshness."""
    from bench import proc_cpu
    from contracts.datasets import load_dataset, user_events
    from contracts.redis_keys import popularity_key
    from jobs.cli import cancel, submit
    from serving.feast_redis import FeastRedisLayout
    from streams.producer import EventPublisher
    from streams.topics import TopicSpec, ensure_topics

    raw, tokens, dlq = f"bench.{run_id}.events.raw", f"bench.{run_id}.events.tokens", f"bench.{run_id}.events.dlq"
    domain = f"bench-{run_id}"
    ensure_topics(settings, extra=[TopicSpec(raw), TopicSpec(tokens), TopicSpec(dlq, 1)])
    layout = FeastRedisLayout.from_repo(settings.feature_repo)
    pop_key = popularity_key(domain)
    # the run's own lake folder, removed at the end: bench users must not land in the lake training reads
    lake = settings.var_dir / "bench" / f"lake-{run_id}"
    lake_args = [] if "--lake" in args.tokenize_args else ["--lake", str(lake)]
    print(f"== submitting tokenize + user_state (run {run_id})")
    common = ["--startup", "earliest", "--parallelism", str(args.parallelism), "--execution-mode", args.execution_mode]
    job_ids = [
        submit("tokenize", ["--source-topic", raw, "--tokens-topic", tokens, "--dlq-topic", dlq,
                            "--group-id", f"bench-{run_id}-tokenize", *common, *lake_args,
                            *shlex.split(args.tokenize_args)],
               detached=True),
        submit("user_state", ["--source-topic", tokens, "--dlq-topic", dlq, "--group-id", f"bench-{run_id}-user-state",
                              *common, *shlex.split(args.user_state_args)], detached=True),
    ]
    try:
        dataset = load_dataset(args.dataset)
        events = []
        for event in user_events(dataset, limit=args.events):
            event["user_id"] = f"{run_id}-{event['user_id']}"
            event["event_id"] = f"{run_id}-{event['event_id']}"
            event["domain"] = domain
            events.append(event)
        publisher = EventPublisher(settings)
        publisher.encode(raw, "user_event", events[0])  # schema registered before the clock starts

        # warm-up: one event through both jobs so start-up is not counted as throughput
        warm = dict(events[0], event_id=f"{run_id}-warmup", user_id=f"{run_id}-warmup")
        publisher.publish(raw, "user_event", warm, warm["user_id"])
        publisher.flush(60)
        deadline = time.monotonic() + 300
        while applied(r, pop_key) < 1:
            if time.monotonic() > deadline:
                raise SystemExit("bench: the jobs applied nothing within 300 s; see `ugt jobs list` and var/log/flink")
            check_jobs(settings, job_ids)
            time.sleep(0.5)

        base = 1
        if args.warmup_events > 0:
            print(f"== warm-up: {args.warmup_events:,} events (other user ids), not timed")
            for event in events[: args.warmup_events]:
                publisher.publish(raw, "user_event", dict(event, event_id=f"{event['event_id']}-warm",
                                                          user_id=f"{event['user_id']}-warm"),
                                  f"{event['user_id']}-warm")
            publisher.flush(300)
            base += min(args.warmup_events, len(events))
            deadline = time.monotonic() + args.timeout_s
            while applied(r, pop_key) < base:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: the warm-up was not applied within {args.timeout_s:.0f} s")
                check_jobs(settings, job_ids)
                time.sleep(0.5)

        print(f"== throughput: {len(events):,} {args.dataset} events at full speed")
        cpu_before = proc_cpu.snapshot(os.getpid())
        spies = []
        if args.py_spy:  # every TaskManager: each embeds its own CPython
            import psutil

            for pid in [p.pid for p in psutil.process_iter(["cmdline"])
                        if any("TaskManagerRunner" in part for part in (p.info["cmdline"] or []))]:
                out = f"/tmp/ugt-bench-{run_id}-py-spy-{pid}.txt"
                spies.append((proc_cpu.start_py_spy(args.py_spy, pid, out), out))
        start = time.time()
        for event in events:
            publisher.publish(raw, "user_event", event, event["user_id"])
        publisher.flush(300)
        produced_s = time.time() - start
        target = len(events) + base
        deadline = time.monotonic() + args.timeout_s
        while (done := applied(r, pop_key)) < target:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {done - base:,} of {len(events):,} applied after {args.timeout_s:.0f} s")
            time.sleep(0.2)
        throughput_s = time.time() - start
        cpu = proc_cpu.diff(cpu_before, proc_cpu.snapshot(os.getpid()))
        cpu["budget"] = cpu_budget(cpu["cpu_s_by_process"], len(events), os.cpu_count() or 1, TARGET_EVENTS_PER_S)
        cpu["taskmanagers_by_job"] = placement(settings, job_ids)
        if len({tuple(tms) for tms in cpu["taskmanagers_by_job"].values()}) < len(cpu["taskmanagers_by_job"]):
            print("bench: warning: tokenize and user_state ran in the same TaskManager (one GIL for both)")
        if spies:
            cpu["python_profile"] = proc_cpu.stop_py_spies(spies)

        print(f"== freshness: {args.probes} probe events at {args.probe_rate}/s")
        probe_base = events[-1]["event_time"]

        def send(i: int) -> bytes:
            user = f"{run_id}-probe-{i}"
            probe = dict(events[i % len(events)], event_id=f"{run_id}-probe-{i}", user_id=user,
                         event_time=probe_base + i)
            publisher.publish(raw, "user_event", probe, user)
            publisher.poll(0)
            return layout.entity_key("user_id", user)

        def seen(keys: list[bytes]) -> list[bytes]:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [k for k, e in zip(keys, pipe.execute(), strict=True) if e]

        lags = steady(send, seen, args.probes, args.probe_rate, 120)
        publisher.flush(30)
    finally:
        for jid in job_ids:  # only this run's jobs: the demo's may be running beside them
            if jid:
                cancel(settings.flink_rest_url, jid)
        drop_topics(settings, [raw, tokens, dlq])
        shutil.rmtree(lake, ignore_errors=True)
    return {"events": len(events), "produce_s": round(produced_s, 2), "throughput_s": round(throughput_s, 2),
            "events_per_s": round(len(events) / throughput_s, 1), "freshness": summary(lags),
            "freshness_probes": len(lags), "cpu": cpu}


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import redis

    from infra import stack
    from infra.settings import get_settings
    from streams.bench_anchor import kafka_raw_anchor
    from streams.topics import ensure_pipeline

    settings = get_settings()
    stack.up(settings=settings, after_kafka=ensure_pipeline)
    run_id = uuid.uuid4().hex[:8]
    r = redis.Redis.from_url(settings.redis_url)

    stale = stale_code_warning()
    if stale:
        print(f"warning: {stale}")
    load_before = os.getloadavg()[0]
    print(f"== anchor: {args.anchor_events:,} Avro events through Kafka, no Flink")
    anchor = kafka_raw_anchor(settings, args.anchor_events)
    users = user_path(args, settings, run_id, r) if args.events > 0 else None
    items = item_path(args, settings, run_id, r) if args.new_items > 0 else None
    if users is None:
        users = {"events": 0, "events_per_s": None, "produce_s": None, "throughput_s": None, "freshness_probes": 0,
                 "freshness": summary([]), "cpu": None}

    result = {
        "benchmark": "nearline",
        "dataset": args.dataset,
        "events": users["events"],
        "parallelism": args.parallelism,
        "execution_mode": args.execution_mode,
        "warmup_events": args.warmup_events,
        "tokenize_args": args.tokenize_args,
        "user_state_args": args.user_state_args,
        "events_per_s": users["events_per_s"],
        "produce_s": users["produce_s"],
        "throughput_s": users["throughput_s"],
        "freshness_probes": users["freshness_probes"],
        "probe_rate_per_s": args.probe_rate,
        "freshness_p50_s": users["freshness"]["p50"],
        "freshness_p99_s": users["freshness"]["p99"],
        "freshness_max_s": users["freshness"]["max"],
        "new_item_p50_s": items["new_item"]["p50"] if items else None,
        "new_item_p99_s": items["new_item"]["p99"] if items else None,
        "new_item_max_s": items["new_item"]["max"] if items else None,
        "items": items,
        "kafka_raw_events_per_s": round(anchor.events_per_s, 1),
        "kafka_raw": anchor.as_dict(),
        "ratio_to_anchor": round(users["events_per_s"] / anchor.events_per_s, 4) if users["events_per_s"] else None,
        "targets": {"events_per_s": TARGET_EVENTS_PER_S, "freshness_p99_s": 1.0, "new_item_p99_s": 10.0},
        "cpu_during_throughput": users["cpu"],
        "stale_code_warning": stale,
        "load_avg_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},  # the box is shared
    }
    print()
    print_table([
        {"measure": "events_per_s (tokenize + user_state)", "value": result["events_per_s"], "target": ">= 50000"},
        {"measure": "kafka_raw_events_per_s (anchor, no Flink)", "value": result["kafka_raw_events_per_s"],
         "target": ""},
        {"measure": "ratio to anchor", "value": result["ratio_to_anchor"], "target": ""},
        {"measure": "freshness p50 (s)", "value": result["freshness_p50_s"], "target": ""},
        {"measure": "freshness p99 (s)", "value": result["freshness_p99_s"], "target": "<= 1"},
        {"measure": "new item p50 (s)", "value": result["new_item_p50_s"], "target": ""},
        {"measure": "new item p99 (s)", "value": result["new_item_p99_s"], "target": "<= 10"},
    ])
    cpu = users["cpu"]
    if cpu is None:
        write_result(args.name, result)
        return 0
    print(f"\nCPU during the throughput window ({cpu['window_s']} s, {cpu['cores_busy']} cores busy of "
          f"{os.cpu_count()}):")
    print_table([{"process": k, "cpu_s": v} for k, v in cpu["cpu_s_by_process"].items()])
    print_table([{"thread group": k, "cpu_s": v} for k, v in cpu["cpu_s_by_thread"].items()])
    budget = cpu["budget"]
    print(f"\nCPU per event (µs): Flink {budget['flink_us_per_event']}, outside Flink "
          f"{budget['outside_flink_us_per_event']} (Kafka, Redis, the load generator); the box has "
          f"{budget['budget_us_per_event_at_target']} µs per event at {TARGET_EVENTS_PER_S:,} events/s. At these "
          f"costs it saturates at {budget['max_events_per_s_at_measured_cost']:,} events/s, and at "
          f"{budget['max_events_per_s_if_flink_were_free']:,} if Flink cost nothing.")
    profile = cpu.get("python_profile") or {}
    if profile.get("samples"):
        print(f"\nTaskManager Python stacks ({profile['samples']} samples): where the samples sat (self)")
        print_table([{"function": k, "share": v} for k, v in profile["self"].items()])
        print_table([{"repo function on the stack": k, "share": v} for k, v in profile["repo_inclusive"].items()])
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
