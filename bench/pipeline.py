"""Replay ML-1M through the running pipeline (Kafka -> Flink tokenize -> Flink user_state -> Redis via Feast).

Measures, in one run on one box:
  events_per_s      ML-1M events replayed at full speed / (first produce -> last event applied in Redis)
  freshness_p50_s   probe events at a steady rate: produced -> the user's state visible in Redis
  freshness_p99_s
  kafka_raw_events_per_s   the anchor: the same Avro events produced + consumed with no Flink

Every run uses its own topics, consumer groups, user-id prefix and domain, so it never mixes with the
demo's or the tests' data. Needs the stack: `ugt stack up` (the script brings it up if it is down).

    python -m bench.pipeline --events 100000 --probes 300 --probe-rate 20
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

from bench.common import print_table, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m", choices=("ml-1m", "ml-100k"))
    parser.add_argument("--events", type=int, default=100_000, help="ML-1M events to replay (default: %(default)s)")
    parser.add_argument("--probes", type=int, default=300, help="freshness probe events (default: %(default)s)")
    parser.add_argument("--probe-rate", type=float, default=20.0, help="probe events per second (default: %(default)s)")
    parser.add_argument("--anchor-events", type=int, default=100_000,
                        help="events for the raw-Kafka anchor (default: %(default)s)")
    parser.add_argument("--parallelism", type=int, default=1,
                        help="Flink parallelism of both jobs (thread mode shares one interpreter per TaskManager)")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--name", default="pipeline", help="result file bench/results/<name>.json")
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def applied(redis_client: Any, key: str) -> int:
    return int(sum(score for _, score in redis_client.zscan_iter(key)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import redis

    from infra import stack
    from infra.settings import get_settings
    from jobs.cli import cancel, submit
    from jobs.user_state_logic import popularity_key
    from serving.feast_redis import FeastRedisLayout
    from streams.bench_anchor import kafka_raw_anchor
    from streams.datasets import load_dataset, user_events
    from streams.producer import EventPublisher
    from streams.topics import TopicSpec, ensure_topics

    settings = get_settings()
    stack.up(settings=settings)
    run_id = uuid.uuid4().hex[:8]
    raw, tokens, dlq = f"bench.{run_id}.events.raw", f"bench.{run_id}.events.tokens", f"bench.{run_id}.events.dlq"
    domain = f"bench-{run_id}"
    ensure_topics(settings, extra=[TopicSpec(raw), TopicSpec(tokens), TopicSpec(dlq, 1)])
    r = redis.Redis.from_url(settings.redis_url)
    layout = FeastRedisLayout.from_repo(settings.feature_repo)
    pop_key = popularity_key(domain)

    print(f"== anchor: {args.anchor_events:,} Avro events through Kafka, no Flink")
    anchor = kafka_raw_anchor(settings, args.anchor_events)

    print(f"== submitting tokenize + user_state (run {run_id})")
    common = ["--startup", "earliest", "--parallelism", str(args.parallelism)]
    job_ids = []
    job_ids.append(submit("tokenize", ["--source-topic", raw, "--tokens-topic", tokens, "--dlq-topic", dlq,
                        "--group-id", f"bench-{run_id}-tokenize", *common], detached=True))
    job_ids.append(submit("user_state", ["--source-topic", tokens, "--dlq-topic", dlq,
                          "--group-id", f"bench-{run_id}-user-state", *common], detached=True))
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
            time.sleep(0.5)

        print(f"== throughput: {len(events):,} {args.dataset} events at full speed")
        start = time.time()
        for event in events:
            publisher.publish(raw, "user_event", event, event["user_id"])
        publisher.flush(300)
        produced_s = time.time() - start
        target = len(events) + 1
        deadline = time.monotonic() + args.timeout_s
        while (done := applied(r, pop_key)) < target:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {done - 1:,} of {len(events):,} applied after {args.timeout_s:.0f} s")
            time.sleep(0.2)
        throughput_s = time.time() - start
        events_per_s = len(events) / throughput_s

        print(f"== freshness: {args.probes} probe events at {args.probe_rate}/s")
        sent: dict[bytes, float] = {}
        seen: dict[bytes, float] = {}
        interval = 1.0 / args.probe_rate
        next_send = time.time()
        probe_base = events[-1]["event_time"]
        i = 0
        deadline = time.monotonic() + args.probes / args.probe_rate + 120
        while len(seen) < args.probes and time.monotonic() < deadline:
            now = time.time()
            if i < args.probes and now >= next_send:
                user = f"{run_id}-probe-{i}"
                probe = dict(events[i % len(events)], event_id=f"{run_id}-probe-{i}", user_id=user,
                             event_time=probe_base + i)
                publisher.publish(raw, "user_event", probe, user)
                publisher.poll(0)
                sent[layout.entity_key("user_id", user)] = time.time()
                i += 1
                next_send += interval
            pending = [k for k in sent if k not in seen]
            if pending:
                pipe = r.pipeline(transaction=False)
                for key in pending:
                    pipe.exists(key)
                checked = time.time()
                for key, exists in zip(pending, pipe.execute(), strict=True):
                    if exists:
                        seen[key] = checked
            time.sleep(0.005)
        publisher.flush(30)
        lags = [seen[k] - sent[k] for k in seen]
        if len(lags) < args.probes:
            print(f"warning: only {len(lags)} of {args.probes} probes became visible")
    finally:
        for jid in job_ids:  # only this run's jobs: the demo's may be running beside them
            if jid:
                cancel(settings.flink_rest_url, jid)

    result = {
        "benchmark": "pipeline",
        "dataset": args.dataset,
        "events": len(events),
        "parallelism": args.parallelism,
        "events_per_s": round(events_per_s, 1),
        "produce_s": round(produced_s, 2),
        "throughput_s": round(throughput_s, 2),
        "freshness_probes": len(lags),
        "probe_rate_per_s": args.probe_rate,
        "freshness_p50_s": round(statistics.median(lags), 4) if lags else None,
        "freshness_p99_s": round(percentile(lags, 99), 4) if lags else None,
        "freshness_max_s": round(max(lags), 4) if lags else None,
        "kafka_raw_events_per_s": round(anchor.events_per_s, 1),
        "kafka_raw": anchor.as_dict(),
        "ratio_to_anchor": round(events_per_s / anchor.events_per_s, 4),
    }
    print()
    print_table([
        {"measure": "events_per_s (tokenize + user_state)", "value": result["events_per_s"]},
        {"measure": "kafka_raw_events_per_s (anchor, no Flink)", "value": result["kafka_raw_events_per_s"]},
        {"measure": "ratio to anchor", "value": result["ratio_to_anchor"]},
        {"measure": "freshness p50 (s)", "value": result["freshness_p50_s"]},
        {"measure": "freshness p99 (s)", "value": result["freshness_p99_s"]},
    ])
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
