"""Failure drills on the cluster profile (issue #20): kill -9 a node under load, count what was lost or doubled.

`broker`: a private cluster-profile Kafka (3 KRaft broker+controller nodes, the stack's ports +
--port-offset, its own var/ folder) takes a replay of ML-1M events from streams.producer.EventPublisher (acks=all,
idempotent) into a topic at replication factor 3, min.insync.replicas=2. Once a third of them is published, one
broker gets `kill -9`; publishing goes on, the broker is started again, and the topic is read back from the start
(read_committed): lost = published ids missing, doubled = ids read more than once. failover_s: from the kill until
no partition is led by the dead broker; recovery_s: from its restart until every partition is in sync (3 ISRs)
again. The drills under the Flink jobs (`redis_master`, `taskmanager`, `restart`: bench/drills_jobs.py) bring up
the whole cluster profile on those ports (3 brokers, the registry, 3+3 Redis Cluster, Flink with 3 TaskManagers).
`python -m bench.drills --help`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

from tqdm import tqdm

from bench.common import print_table, result_path, write_result
from bench.drills_jobs import JOB_DRILLS
from contracts.datasets import load_dataset, user_events
from infra import stack as stack_mod
from infra.processes import read_pids, write_pids
from infra.settings import REPO_ROOT, Settings
from infra.stack_cluster import start_kafka_node
from infra.stack_errors import StackError
from streams.topics import ensure_pipeline

DRILLS = ("broker", *JOB_DRILLS)


def drill_settings(offset: int, folder: str = "drills") -> Settings:
    """The cluster profile on the stack's ports + offset, in var/<folder>/ (so the stack itself may keep running).
    Sets the UGT_* variables, so the processes it starts (Flink's TaskManagers, `flink run`) see the same; and puts
    this checkout first on PYTHONPATH, so `flink run -py` imports its packages (not an editable install's)."""
    base = Settings()
    os.environ.update({
        "UGT_PROFILE": "cluster", "UGT_VAR": str(base.var_dir / folder),
        "UGT_KAFKA_PORT": str(base.kafka_port + offset),
        "UGT_KAFKA_CONTROLLER_PORT": str(base.kafka_controller_port + offset),
        "UGT_REGISTRY_PORT": str(base.registry_port + offset),
        "UGT_REDIS_PORT": str(base.redis_port + offset),
        "UGT_FLINK_PORT": str(base.flink_rest_port + offset),
        "UGT_FLINK_RPC_PORT": str(base.flink_rpc_port + offset),
        "UGT_FLINK_METRICS_PORT": str(base.flink_metrics_port + offset),
        "UGT_SERVING_PORT": str(base.serving_port + offset),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    for name in ("UGT_KAFKA_BOOTSTRAP", "UGT_REDIS_URL", "UGT_REGISTRY_URL", "UGT_FLINK_REST",
                 "UGT_KAFKA_CLUSTER_CONTROLLER_PORT", "UGT_REDIS_CLUSTER_PORT", "UGT_FLINK_TASKMANAGERS",
                 "UGT_JOB_PARALLELISM"):
        os.environ.pop(name, None)
    return Settings()


def partition_state(s: Settings, topic: str) -> list[tuple[int, int]]:
    """(leader, in-sync replicas) of each partition of `topic`."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": s.kafka_bootstrap}).list_topics(topic, timeout=10)
    return [(p.leader, len(p.isrs)) for p in metadata.topics[topic].partitions.values()]


def wait_until(check, timeout_s: float = 120.0) -> float:
    """Seconds until check() holds (polled every 0.2 s); raises at the timeout."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"not within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - t0


def read_ids(s: Settings, topic: str, expected: int) -> Counter[str]:
    """Every event_id in `topic` from the start, read_committed, until `expected` records or 60 s of silence."""
    from confluent_kafka import Consumer

    from streams.serde import AvroSerde, SchemaRegistryClient

    serde = AvroSerde(SchemaRegistryClient(s.registry_url))
    consumer = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": f"drill-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                         "enable.auto.commit": False})
    consumer.subscribe([topic])
    ids: Counter[str] = Counter()
    quiet_since = time.monotonic()
    try:
        while sum(ids.values()) < expected and time.monotonic() - quiet_since < 60:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                ids[serde.decode(msg.value()).record["event_id"]] += 1
                quiet_since = time.monotonic()
    finally:
        consumer.close()
    return ids


def broker_drill(s: Settings, n_events: int) -> dict[str, Any]:
    from streams.producer import EventPublisher
    from streams.topics import TopicSpec, ensure_topics

    topic = f"drill-{uuid.uuid4().hex[:8]}.raw"
    ensure_topics(s, extra=[TopicSpec(topic)])
    events = user_events(load_dataset("ml-1m"), limit=n_events)
    victim_node = 2
    victim = read_pids(s, "kafka")[victim_node - 1]
    failover: list[float] = []

    def watch_failover() -> None:  # from the kill until no partition is led by the dead broker
        killed_at = time.monotonic()
        wait_until(lambda: all(leader != victim_node for leader, _ in partition_state(s, topic)))
        failover.append(time.monotonic() - killed_at)

    watcher = threading.Thread(target=watch_failover, daemon=True)
    with EventPublisher(s) as publisher:
        for i, event in enumerate(tqdm(events, desc="publish", file=sys.stderr)):
            publisher.publish_user_event(event, topic=topic)
            if i == n_events // 3:
                os.kill(victim, signal.SIGKILL)
                watcher.start()
        publisher.flush(timeout_s=180)
    watcher.join(timeout=180)
    restarted = time.monotonic()
    pids = read_pids(s, "kafka")
    pids[victim_node - 1] = start_kafka_node(s, victim_node)
    write_pids(s, "kafka", pids)
    wait_until(lambda: all(isr == 3 for _, isr in partition_state(s, topic)), 180)
    recovery_s = time.monotonic() - restarted
    ids = read_ids(s, topic, n_events)
    published = {e["event_id"] for e in events}
    return {"drill": "kill -9 one of 3 brokers while publishing (RF 3, min ISR 2, acks=all, idempotent)",
            "events": n_events, "lost": len(published - set(ids)), "doubled": sum(c - 1 for c in ids.values()),
            "fallback_answers": None, "failover_s": round(failover[0], 2) if failover else None,
            "recovery_s": round(recovery_s, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drills", default=",".join(DRILLS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--events", type=int, default=100_000,
                        help="ML-1M events of the broker drill (default: %(default)s)")
    parser.add_argument("--job-events", type=int, default=10_000,
                        help="ML-1M events of each drill under the jobs (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="events/s published into the jobs, so the failure meets a running stream "
                             "(default: %(default)s)")
    parser.add_argument("--serving-rate", type=float, default=30.0,
                        help="/recommend calls/s to `ugt serve` during the redis_master drill (default: %(default)s)")
    parser.add_argument("--port-offset", type=int, default=400,
                        help="the drill cluster's ports = the stack's + this (default: %(default)s)")
    parser.add_argument("--out", default=str(result_path("drills")))
    args = parser.parse_args(argv)
    chosen = [d for d in args.drills.split(",") if d]
    unknown = sorted(set(chosen) - set(DRILLS))
    if unknown:
        parser.error(f"unknown drill(s) {unknown}; built: {', '.join(DRILLS)}")
    s = drill_settings(args.port_offset)
    services = ["kafka", "registry"] if chosen == ["broker"] else None  # the jobs' drills: the whole profile
    rows = []
    try:
        try:
            stack_mod.up(only=services, settings=s, log=print, after_kafka=ensure_pipeline)
        except StackError as exc:  # a loaded box: `up` again waits once more for what is still starting
            print(f"{exc}\nwaiting once more ...", flush=True)
            stack_mod.up(only=services, settings=s, log=print, after_kafka=ensure_pipeline)
        for drill in chosen:
            print(f"drill {drill} ...", flush=True)
            if drill == "broker":
                rows.append(broker_drill(s, args.events))
            elif drill == "redis_master":
                rows.append(JOB_DRILLS[drill](s, args.job_events, args.rate, serving_rate=args.serving_rate))
            else:
                rows.append(JOB_DRILLS[drill](s, args.job_events, args.rate))
            print_table(rows[-1:])
    finally:
        stack_mod.down(only=services, settings=s, log=print)
    print_table(rows)
    write_result(args.out, "drills", {
        "profile": "cluster profile on one box (infra/stack_cluster.py), loopback, own ports and var/drills/",
        "load": f"shared 2-core VM, load average {os.getloadavg()[0]:.1f} at the end",
        "events": "ML-1M user events in event-time order (contracts.datasets.user_events); the broker drill "
                  f"{args.events}, each drill under the jobs {args.job_events} published at {args.rate:g}/s",
        "jobs": "tokenize (--delivery exactly-once) + user_state (thread mode, --redis-wait-replicas default 1) at "
                f"parallelism {s.job_parallelism} on {s.flink_taskmanagers} TaskManagers, checkpoints every 2 s",
        "serving": f"redis_master: one `ugt serve` (thread engine, default config: direct Redis state reads, the "
                   f"popularity model) on port {s.serving_port}, /recommend for the stream's users round robin at "
                   f"{args.serving_rate:g}/s, 3 s client timeout, from the first applied event until 5 s after the "
                   "dead node rejoined; fallback_answers: fallbacks the failure caused (any reason but unknown_user, "
                   "and unknown_user of a user the model had answered)",
    }, {"rows": rows}, argv=argv, prog="python -m bench.drills" if argv is not None else None)


if __name__ == "__main__":
    main()
