"""The nearline layer on the running stack: throughput, freshness and new-item delay, with the Kafka anchor.

Measures, in one run on one box (the shared standalone Flink cluster, Kafka, Redis):
  kafka_raw_events_per_s   the anchor: the same Avro user events produced + consumed back, no Flink
  events_per_s      dataset events replayed at full speed through tokenize + user_state:
                    events / (first produce -> last event applied in Redis); job start-up not counted, and
                    --warmup-events (other users) go through first, so the TaskManagers' JIT and caches are
                    as warm as in a job that has been running
  freshness_p50_s   probe events at a steady rate: produced -> the user's state visible in Redis
  freshness_p99_s   (both jobs --delivery at-least-once, checkpoints every 10 s)
  freshness_exactly_once_p50_s   the same again on a second pair of jobs with --delivery exactly-once (their
  freshness_exactly_once_p99_s   default checkpoint interval, or --exactly-once-args): user_state reads
                    read_committed, so an event waits for tokenize's next checkpoint; flink_cpu_us_per_event
                    beside flink_cpu_us_per_event_exactly_once is what the shorter interval + transactions cost
  new_item_p50_s    brand-new catalog items at a steady rate through item_semantic_ids (the artifact of
  new_item_p99_s    --artifact): produced -> its code in the generator's decode index (ugt:sid:item:<version>)
  cpu               who ate the CPU during the throughput window (bench.proc_cpu: per process, per thread)
The two measured paths live in bench.nearline_paths; this module runs them and writes the result.

Every run uses its own topics, consumer groups, user-id prefix, domain, item ids, active-version key and lake
folder (var/bench/lake-<run>), so it never mixes with the demo's or the tests' data; its jobs are cancelled, its
lake folder deleted and its new items removed from the index at the end. Needs the stack (`ugt stack up`; the script brings it up if it is down) and, for the item phase, a
semantic-ID artifact (`ugt semantic-ids build --dataset ml-1m --config models/configs/semantic_ids_ml1m.yaml
--out runs/sid/ml1m`; or --new-items 0 to skip).

    python -m bench.nearline                                  # full run -> bench/results/nearline.json
    python -m bench.nearline --events 20000 --warmup-events 0 --probes 50 --new-items 20 --anchor-events 20000 \
        --name nearline-quick
    python -m bench.nearline --only freshness --events 50000 --warmup-events 10000   # both deliveries, no anchor
    python -m bench.nearline --stack-profiles single,cluster --new-items 0 --name nearline-profiles
        # the same workload on the single-node stack, then on a cluster profile of its own (ports + 200): one
        # result, each profile's numbers under `profiles`, CPU per event side by side (the cost of replication)
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import jvm_profile, proc_cpu
from bench.common import print_table, result_path, write_result
from bench.nearline_paths import TARGET_EVENTS_PER_S, item_path, stack_scope, summary, user_path

PROG = "python -m bench.nearline"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m",
                        help="ml-1m, ml-100k or a generic-format folder (interactions.csv + optional items.jsonl)")
    parser.add_argument("--events", type=int, default=200_000,
                        help="dataset events to replay; 0 skips the user path (default: %(default)s)")
    parser.add_argument("--warmup-events", type=int, default=50_000,
                        help="dataset events replayed through both jobs (other user ids) before the throughput "
                        "window, so a fresh TaskManager's JIT and caches are warm, as in a job that has been "
                        "running (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=1,
                        help="throughput windows back to back per user path, each with the events as new users: "
                        "the first is the headline (as before), the last the steady-state figure "
                        "(flink_cpu_us_per_event_steady), once the JIT has run longer (default: %(default)s)")
    parser.add_argument("--probes", type=int, default=300, help="freshness probe events (default: %(default)s)")
    parser.add_argument("--probe-rate", type=float, default=20.0, help="probe events per second (default: %(default)s)")
    parser.add_argument("--anchor-events", type=int, default=100_000,
                        help="events for the raw-Kafka anchor (default: %(default)s)")
    parser.add_argument("--parallelism", type=int, default=None,
                        help="Flink parallelism of the jobs (default: the profile's, 1 single-node, 2 cluster)")
    parser.add_argument("--stack-profiles", default=None,
                        help="single,cluster: the same workload on the stack (single-node profile) and then on a "
                        "cluster profile of the bench's own (3 brokers RF 3, Redis Cluster 3+3, Flink 3 TaskManagers; "
                        "ports + --cluster-port-offset, var/nearline-cluster/, stopped at the end), one after the "
                        "other, in one result with CPU per event side by side (default: the stack's own profile)")
    parser.add_argument("--cluster-port-offset", type=int, default=200,
                        help="the cluster profile's ports = the stack's + this (default: %(default)s)")
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
    parser.add_argument("--tokenize-engines", default="sql",
                        help="tokenize --engine of the user path, or several comma-separated (e.g. python,sql): the "
                        "user path runs once per engine, in this order, each on its own topics; with several, the "
                        "result holds flink_cpu_us_per_event_by_engine; the headline numbers and the exactly-once "
                        "path are the first engine's; an entry ENGINE TOKENIZE_ARGS:USER_STATE_ARGS (e.g. "
                        "\"sql,sql:--batch-ms 0\" or \"sql,sql --lake ''\") also gives that run's tokenize and "
                        "user_state those options (default: %(default)s, the job's default)")
    parser.add_argument("--py-spy", default=None,
                        help="path of a py-spy binary: sample the TaskManager's Python stacks during the throughput "
                        "window (where inside the Python operators the time goes)")
    parser.add_argument("--jfr", action="store_true",
                        help="Java Flight Recorder on every TaskManager during each throughput window: the Java "
                        "methods and components (Avro, Kafka, SQL runtime, UGT's Java ...) the CPU went to "
                        "(bench/jvm_profile.py; needs jcmd and jfr, in any JDK 11+)")
    parser.add_argument("--exactly-once", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the user path with --delivery exactly-once (default: %(default)s)")
    parser.add_argument("--exactly-once-args", default="",
                        help="extra options of the exactly-once jobs, e.g. \"--checkpoint-interval-ms 1000\"")
    parser.add_argument("--only", choices=("all", "freshness"), default="all",
                        help="freshness: only the user paths (throughput, CPU, freshness of both deliveries), "
                        "no Kafka anchor and no item path (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--name", default="nearline", help="result file bench/results/<name>.json")
    return parser.parse_args(argv)

def stale_code_warning() -> str | None:
    """In thread mode the TaskManager's embedded CPython keeps modules imported by earlier jobs: if the TM started
    before the job code last changed, a new job may run the old code. Says so (the result records it)."""
    from infra.settings import REPO_ROOT, get_settings

    started = [p.create_time() for p in proc_cpu.processes_running("TaskManagerRunner", stack_scope(get_settings()))]
    if not started:
        return None
    files = [f for folder in ("jobs", "models", "streams") for f in (REPO_ROOT / folder).rglob("*.py")]
    newest = max(files, key=lambda f: f.stat().st_mtime)
    if newest.stat().st_mtime <= min(started):
        return None
    return (f"the TaskManager started {time.ctime(min(started))}, before {newest.relative_to(REPO_ROOT)} changed "
            f"({time.ctime(newest.stat().st_mtime)}): thread-mode jobs may run modules an earlier job imported")


def engine_args(args: argparse.Namespace, variant: str) -> argparse.Namespace:
    """args with tokenize's --engine added to the tokenize args; a variant `ENGINE TOKENIZE_ARGS:USER_STATE_ARGS`
    (e.g. `sql --lake '':--batch-ms 0`, both parts optional) also adds those to tokenize's and user_state's."""
    tokenize, _, user_state = variant.partition(":")
    engine, _, extra = tokenize.strip().partition(" ")  # `sql --lake ''`: tokenize options of this entry's own
    tokenize_args = " ".join(filter(None, (args.tokenize_args, f"--engine {engine}", extra.strip())))
    return argparse.Namespace(**{**vars(args), "tokenize_args": tokenize_args,
                                 "user_state_args": f"{getattr(args, 'user_state_args', '')} {user_state}".strip()})


def engine_paths(args: argparse.Namespace, settings: Any, run_id: str, r: Any) -> dict[str, dict[str, Any]]:
    """The at-least-once user path once per --tokenize-engines engine, back to back on the same stack."""
    engines = [e.strip() for e in args.tokenize_engines.split(",") if e.strip()]
    return {engine: user_path(engine_args(args, engine), settings, f"{run_id}-{i}", r)
            for i, engine in enumerate(engines)}


def flink_us(users: dict[str, Any] | None) -> float | None:
    """Flink's CPU per event in the user path's throughput window (load-independent, unlike events/s)."""
    return users["cpu"]["budget"]["flink_us_per_event"] if users and users.get("cpu") else None


THREAD_GROUPS = {"user_state": ("user-state", "Source: tokens_"), "tokenize_task": ("Source: raw_sou",)}


def per_event_us(window: dict[str, Any] | None) -> dict[str, float] | None:
    """A throughput window's Flink CPU per event split: user_state's threads (its Python operator's task and its
    source + batcher task), tokenize's task thread, the JIT compiler threads (top thread groups only, but these
    are the busiest)."""
    if not window or not window.get("cpu"):
        return None
    cpu, events = window["cpu"], window["events"]
    out = {name: round(sum(v for k, v in cpu["cpu_s_by_thread"].items() if any(n in k for n in names))
                       / events * 1e6, 1) for name, names in THREAD_GROUPS.items()}
    out["jit"] = cpu["budget"]["flink_jit_us_per_event"]
    out["flink"] = cpu["budget"]["flink_us_per_event"]
    out["flink_without_jit"] = round(out["flink"] - out["jit"], 1)
    return out


def exactly_once_record(eo: dict[str, Any] | None) -> dict[str, Any]:
    """The exactly-once user path's headline numbers (None when it did not run)."""
    fresh = eo["freshness"] if eo else {}
    return {
        "freshness_exactly_once_p50_s": fresh.get("p50"),
        "freshness_exactly_once_p99_s": fresh.get("p99"),
        "freshness_exactly_once_max_s": fresh.get("max"),
        "events_per_s_exactly_once": eo["events_per_s"] if eo else None,
        "flink_cpu_us_per_event_exactly_once": flink_us(eo),
        "exactly_once": eo,
    }


def nearline_record(args: argparse.Namespace, anchor: Any, users: dict[str, Any],
                    items: dict[str, Any] | None, eo: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result's numbers: the user paths (both deliveries), the item path and the Kafka anchor side by side."""
    anchor_rate = round(anchor.events_per_s, 1) if anchor else None
    return {
        "events": users["events"],
        "events_per_s": users["events_per_s"],
        "produce_s": users["produce_s"],
        "throughput_s": users["throughput_s"],
        "freshness_probes": users["freshness_probes"],
        "freshness_p50_s": users["freshness"]["p50"],
        "freshness_p99_s": users["freshness"]["p99"],
        "freshness_max_s": users["freshness"]["max"],
        "new_item_p50_s": items["new_item"]["p50"] if items else None,
        "new_item_p99_s": items["new_item"]["p99"] if items else None,
        "new_item_max_s": items["new_item"]["max"] if items else None,
        "items": items,
        "flink_cpu_us_per_event": flink_us(users),
        "flink_cpu_us_per_event_steady": flink_us(users.get("steady")),  # the last of --windows (None: one)
        **exactly_once_record(eo),
        "kafka_raw_events_per_s": anchor_rate,
        "kafka_raw": anchor.as_dict() if anchor else None,
        "ratio_to_anchor": round(users["events_per_s"] / anchor_rate, 4) if users["events_per_s"] and anchor_rate
        else None,
        "cpu_during_throughput": users["cpu"],
        "windows": users.get("windows"),  # each --windows window's events/s, Flink CPU, threads (and JFR's profile)
    }


def print_summary(result: dict[str, Any]) -> None:
    """The measures against their targets, then where the CPU went in the throughput window (if measured)."""
    print()
    print_table([
        {"measure": "events_per_s (tokenize + user_state)", "value": result["events_per_s"], "target": ">= 50000"},
        {"measure": "kafka_raw_events_per_s (anchor, no Flink)", "value": result["kafka_raw_events_per_s"],
         "target": ""},
        {"measure": "ratio to anchor", "value": result["ratio_to_anchor"], "target": ""},
        {"measure": "freshness p50 (s)", "value": result["freshness_p50_s"], "target": ""},
        {"measure": "freshness p99 (s)", "value": result["freshness_p99_s"], "target": "<= 1"},
        {"measure": "freshness exactly-once p50 (s)", "value": result["freshness_exactly_once_p50_s"], "target": ""},
        {"measure": "freshness exactly-once p99 (s)", "value": result["freshness_exactly_once_p99_s"],
         "target": "<= 1"},
        {"measure": "Flink CPU µs/event at-least-once", "value": result["flink_cpu_us_per_event"], "target": "<= 40"},
        {"measure": "Flink CPU µs/event exactly-once", "value": result["flink_cpu_us_per_event_exactly_once"],
         "target": "<= 40"},
        {"measure": "new item p50 (s)", "value": result["new_item_p50_s"], "target": ""},
        {"measure": "new item p99 (s)", "value": result["new_item_p99_s"], "target": "<= 10"},
    ])
    for engine, row in (result.get("engines") or {}).items():
        print(f"{engine}: Flink µs/event split, first window {row['per_event_us_first_window']}, "
              f"steady {row['per_event_us_steady']}")
    cpu = result["cpu_during_throughput"]
    if cpu is None:
        return
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


def profile_label(settings: Any) -> dict[str, Any]:
    """What a profile's row ran on: brokers, topic replication, Redis, TaskManagers, the jobs' parallelism."""
    return {"profile": settings.profile, "kafka_brokers": len(settings.kafka_broker_ports),
            "topic_replication": settings.topic_replication,
            "redis": (f"Redis Cluster {settings.redis_masters} masters + {settings.redis_masters} replicas, AOF "
                      f"appendfsync {settings.redis_appendfsync}") if settings.cluster
            else f"one Redis, AOF appendfsync {settings.redis_appendfsync}",
            "flink_taskmanagers": settings.flink_taskmanagers, "var": str(settings.var_dir)}


@contextmanager
def profile_stack(profile: str | None, port_offset: int) -> Iterator[Any]:
    """The Settings a profile's run uses. None: the stack as configured (what the bench always did). single: the
    same stack, which must be the single-node profile. cluster: a cluster profile of the bench's own, on the
    stack's ports + port_offset in var/nearline-cluster/ (bench.drills.drill_settings), stopped at the end."""
    from infra import stack
    from infra.settings import get_settings

    if profile != "cluster":
        settings = get_settings()
        if profile == "single" and settings.cluster:
            raise SystemExit("bench: --stack-profiles single runs on the stack of the UGT_* ports, which is the "
                             "cluster profile; bring up the single-node profile there (`ugt stack up`)")
        yield settings
        return
    from bench.drills import drill_settings

    saved = dict(os.environ)
    settings = drill_settings(port_offset, folder="nearline-cluster")
    try:
        yield settings
    finally:
        stack.down(settings=settings, log=print)
        os.environ.clear()
        os.environ.update(saved)


def measure(args: argparse.Namespace, settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One profile's run on `settings`' stack (brought up if down): (the result, its conditions)."""
    from bench.drills_jobs import ensure_feast_applied
    from infra import stack
    from infra.redis_client import redis_client
    from infra.stack_errors import StackError
    from streams.bench_anchor import kafka_raw_anchor
    from streams.topics import ensure_pipeline

    args = argparse.Namespace(**{**vars(args), "parallelism": args.parallelism or settings.job_parallelism})
    try:
        stack.up(settings=settings, after_kafka=ensure_pipeline)
    except StackError as exc:  # a loaded box (3 brokers, 3 TaskManagers): `up` again waits once more, as drills do
        print(f"{exc}\nwaiting once more ...", flush=True)
        stack.up(settings=settings, after_kafka=ensure_pipeline)
    ensure_feast_applied(settings)  # a fresh profile's registry (var/nearline-cluster/) has no views yet
    run_id = uuid.uuid4().hex[:8]
    r = redis_client(settings)

    stale = stale_code_warning()
    if stale:
        print(f"warning: {stale}")
    load_before = os.getloadavg()[0]
    anchor = None
    if args.only == "all":
        print(f"== anchor: {args.anchor_events:,} Avro events through Kafka, no Flink")
        anchor = kafka_raw_anchor(settings, args.anchor_events)
    by_engine = engine_paths(args, settings, run_id, r) if args.events > 0 else {}
    first = engine_args(args, next(iter(by_engine))) if by_engine else args
    users = next(iter(by_engine.values())) if by_engine else None
    eo = user_path(first, settings, f"{run_id}-eo", r, "exactly-once") if args.events > 0 and args.exactly_once \
        else None
    items = item_path(args, settings, run_id, r) if args.new_items > 0 and args.only == "all" else None
    if users is None:
        users = {"events": 0, "events_per_s": None, "produce_s": None, "throughput_s": None, "freshness_probes": 0,
                 "freshness": summary([]), "cpu": None}
    result = nearline_record(args, anchor, users, items, eo)
    if len(by_engine) > 1:
        result["flink_cpu_us_per_event_by_engine"] = {e: flink_us(u) for e, u in by_engine.items()}
        result["events_per_s_by_engine"] = {e: u["events_per_s"] for e, u in by_engine.items()}
        result["freshness_p99_s_by_engine"] = {e: u["freshness"]["p99"] for e, u in by_engine.items()}
        result["flink_cpu_us_per_event_by_engine_steady"] = {e: flink_us(u.get("steady")) for e, u in by_engine.items()}
        result["engines"] = {e: {"events_per_s": u["events_per_s"], "freshness": u["freshness"], "cpu": u["cpu"],
                                 "checkpoints": u.get("checkpoints"), "windows": u.get("windows"),
                                 "per_event_us_first_window": per_event_us(u),
                                 "per_event_us_steady": per_event_us(u.get("steady"))}
                             for e, u in by_engine.items()}
    return result, run_conditions(args, first, by_engine, stale, load_before)


def run_conditions(args: argparse.Namespace, first: argparse.Namespace, by_engine: dict[str, Any],
                   stale: str | None, load_before: float) -> dict[str, Any]:
    return {
        "dataset": args.dataset,
        "events": args.events,
        "parallelism": args.parallelism,
        "execution_mode": args.execution_mode,
        "warmup_events": args.warmup_events,
        "windows": args.windows,
        "tokenize_args": first.tokenize_args,
        "tokenize_engines": list(by_engine) or None,
        "user_state_args": first.user_state_args,
        "only": args.only,
        "delivery": {"at-least-once": "checkpoint every 10 s (the default)",
                     "exactly-once": f"both jobs --delivery exactly-once {args.exactly_once_args}".strip()
                     + ("" if "--checkpoint-interval-ms" in args.exactly_once_args else
                        " (default checkpoint interval 250 ms, min-pause 125 ms)")} if args.exactly_once else None,
        "probe_rate_per_s": args.probe_rate,
        "anchor_events": args.anchor_events,
        "item_rate_per_s": args.item_rate,
        "item_flush_ms": args.item_flush_ms,
        "targets": {"events_per_s": TARGET_EVENTS_PER_S, "freshness_p99_s": 1.0, "new_item_p99_s": 10.0},
        "stale_code_warning": stale,
        "load_avg_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},  # the box is shared
    }


def cpu_per_event(result: dict[str, Any]) -> dict[str, Any]:
    """A profile's CPU per event in the at-least-once throughput window: what replication costs, load aside."""
    cpu = result.get("cpu_during_throughput") or {}
    budget = cpu.get("budget") or {}
    flink, outside = budget.get("flink_us_per_event"), budget.get("outside_flink_us_per_event")
    return {"events_per_s": result["events_per_s"], "flink_us_per_event": flink,
            "outside_flink_us_per_event": outside,
            "total_us_per_event": round(flink + outside, 1) if flink is not None and outside is not None else None,
            "us_per_event_by_process": budget.get("us_per_event_by_process"),
            "flink_us_per_event_exactly_once": result["flink_cpu_us_per_event_exactly_once"]}


def combine(runs: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Several profiles' runs in one result: the first one's numbers where a single run's are (so readers of
    nearline.json keep working), each profile's in `stack_profiles`, and their CPU per event side by side."""
    first_name = next(iter(runs))
    result, conditions = runs[first_name]
    result = {**result, "stack_profile": first_name,
              "cpu_per_event_by_stack_profile": {name: cpu_per_event(r) for name, (r, _) in runs.items()},
              "stack_profiles": {name: r for name, (r, _) in runs.items()}}
    conditions = {**conditions, "stack_profiles": {name: c for name, (_, c) in runs.items()}}
    return result, conditions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.windows < 1:
        raise SystemExit("bench: --windows must be >= 1")
    if args.jfr and (why := jvm_profile.tools_missing()):
        raise SystemExit(f"bench: --jfr: {why}; install a JDK (e.g. apt-get install openjdk-17-jdk-headless)")
    profiles = [p.strip() for p in (args.stack_profiles or "").split(",") if p.strip()] or [None]
    unknown = sorted(set(profiles) - {None, "single", "cluster"})
    if unknown or len(set(profiles)) < len(profiles):
        raise SystemExit(f"bench: --stack-profiles takes single and/or cluster, each once; got {args.stack_profiles!r}")
    runs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for profile in profiles:
        with profile_stack(profile, args.cluster_port_offset) as settings:
            print(f"== profile {settings.profile}: {profile_label(settings)}")
            result, conditions = measure(args, settings)
            runs[settings.profile] = result, {**conditions, "stack": profile_label(settings)}
            print_summary(result)
    result, conditions = runs[next(iter(runs))] if len(runs) == 1 else combine(runs)
    if len(runs) > 1:
        print()
        print_table([{"profile": name, **{k: v for k, v in row.items() if k != "us_per_event_by_process"}}
                     for name, row in result["cpu_per_event_by_stack_profile"].items()])
    write_result(result_path(args.name), "nearline", conditions, result, argv, PROG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
