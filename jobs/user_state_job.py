"""PyFlink job `user_state`: events.tokens -> per-user state (keyed ValueState) -> Feast online + popularity.

    <pyflink>/bin/flink run -py jobs/user_state_job.py [--bounded] [--max-events 200] ...   # on the cluster
    python jobs/user_state_job.py --local [--bounded] ...                                  # in-process

Wiring only; the logic is jobs/user_state_logic.py, the operators jobs/operators/user_state_fn.py.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from contracts.user_state_rule import DEFAULT_MAX_EVENTS
    from infra.settings import get_settings
    from jobs.common import add_common_arguments

    s = get_settings()
    parser.add_argument("--source-topic", default=s.topics.tokens, help="input topic (default: %(default)s)")
    parser.add_argument("--dlq-topic", default=s.topics.dlq, help="dead-letter topic (default: %(default)s)")
    parser.add_argument("--max-events", type=int, default=DEFAULT_MAX_EVENTS,
                        help="events kept per user, newest last (default: %(default)s)")
    parser.add_argument("--feature-repo", default=str(s.feature_repo), help="Feast repo (default: %(default)s)")
    parser.add_argument("--flush-rows", type=int, default=500,
                        help="write to Feast once this many users changed (default: %(default)s)")
    parser.add_argument("--flush-ms", type=int, default=200,
                        help="... or once the oldest change waited this long (default: %(default)s)")
    parser.add_argument("--allowed-lateness-s", type=float, default=24 * 3600,
                        help="an event older than the user's newest event minus this goes to the DLQ as "
                             "LATE_EVENT; < 0 turns the rule off (default: %(default)s)")
    parser.add_argument("--compact-interval-min", type=float, default=5.0,
                        help="nearline: per active user, compact the long-term history this often "
                             "(processing time; default: %(default)s, as in the seed)")
    parser.add_argument("--state-ttl-days", type=float, default=90.0,
                        help="Flink state TTL of an idle user (match feature_store.yaml key_ttl_seconds; "
                             "default: %(default)s)")
    parser.add_argument("--state-cache-users", type=int, default=5_000,
                        help="decoded user states kept in memory per parallel instance, ~10-60 KiB each "
                             "(0 = decode every event; default: %(default)s)")
    parser.add_argument("--feast-write", choices=("direct", "push"), default="direct",
                        help="direct: write_rows of UGT's Feast online store (docs/FEAST.md; 0.6x "
                             "the CPU of push); push: store.push(..., to=PushMode.ONLINE) (default: %(default)s)")
    parser.add_argument("--redis-wait-replicas", type=int, default=-1,
                        help="after each flush, WAIT until this many replicas of every Redis master acknowledged "
                             "it (jobs/replica_wait.py); -1 = 1 when --redis names a Redis Cluster (the cluster "
                             "profile), else 0 (default: %(default)s)")
    parser.add_argument("--redis-wait-timeout-ms", type=int, default=5000,
                        help="how long WAIT may take before the flush fails (default: %(default)s)")
    parser.add_argument("--batch-ms", type=int, default=50,
                        help="group each user's records in the JVM for up to this long and run the Python operator "
                             "once per (user, batch) (jobs/user_state_batch.py); batches also end at --batch-records, "
                             "before each checkpoint barrier and at the end of input; 0 = one Python call per record "
                             "(default: %(default)s)")
    parser.add_argument("--batch-records", type=int, default=2000,
                        help="... or once this many records wait, all users together (default: %(default)s)")
    parser.add_argument("--batch-fold", choices=("batch", "per-record"), default="batch",
                        help="how user_state takes a micro-batch: batch = decoded in one pass and folded with the "
                             "user's state loaded once (jobs/token_batch.py); per-record = each record through the "
                             "per-record path, as before 2026-12-07, for A/B runs (default: %(default)s)")
    add_common_arguments(parser, "user_state")


def build_pipeline(env, t_env, cfg) -> None:
    """events.tokens -> keyed by the record key (= user_id) -> UserStateFunction (decodes; writes Feast + Redis);
    bad or late -> DLQ. Keyed by the Kafka key in the JVM (jobs.common.keyed_kafka_source), not by a decoded
    field: no Python call before the shuffle, no pickled event. With --batch-ms > 0 the JVM also groups each
    key's records into micro-batches (jobs.user_state_batch) and UserStateBatchFunction runs once per batch."""
    from pyflink.common import Types

    from jobs.common import add_kafka_sink, discard, keyed_kafka_source
    from jobs.operators.user_state_fn import DLQ_TAG, LATE_TAG, UserStateBatchFunction, UserStateFunction
    from jobs.user_state_batch import batched_kafka_source
    from jobs.user_state_logic import ProcessorConfig

    x = cfg.extra
    config = ProcessorConfig(
        max_events=x["max_events"],
        allowed_lateness_ms=None if x["allowed_lateness_s"] < 0 else int(x["allowed_lateness_s"] * 1000),
        flush_ms=x["flush_ms"],
        compact_interval_ms=int(x["compact_interval_min"] * 60_000),
        state_ttl_ms=int(x["state_ttl_days"] * 86_400_000),
        cache_size=x["state_cache_users"],
    )
    options = (cfg.redis, x["feature_repo"], cfg.registry, x["dlq_topic"], config, x["flush_rows"], x["feast_write"],
               x["wait_replicas"], x["wait_timeout_ms"])
    if x["batch_ms"] > 0:
        source = batched_kafka_source(env, t_env, "tokens_source", x["source_topic"], cfg, x["batch_ms"],
                                      x["batch_records"])
        function = UserStateBatchFunction(*options, per_record=x["batch_fold"] == "per-record")
    else:
        source = keyed_kafka_source(t_env, "tokens_source", x["source_topic"], cfg)
        function = UserStateFunction(*options)
    states = source.process(function, output_type=Types.BOOLEAN()) \
        .name("user-state").uid("user-state")
    discard(states)
    statements = t_env.create_statement_set()
    dead = states.get_side_output(DLQ_TAG).union(states.get_side_output(LATE_TAG))
    add_kafka_sink(t_env, statements, dead, "dlq_sink", x["dlq_topic"], cfg)
    statements.attach_as_datastream()


def wait_replicas(requested: int, redis_url: str) -> int:
    """--redis-wait-replicas resolved: -1 means 1 on a Redis Cluster (a replica per master), 0 on one node."""
    from infra.redis_client import is_cluster_url

    return (1 if is_cluster_url(redis_url) else 0) if requested == -1 else requested


def main(argv: list[str] | None = None) -> int:
    from jobs.common import JobSetupError, run_job

    def options(args: argparse.Namespace) -> dict:
        if args.max_events < 1 or args.flush_rows < 1 or args.flush_ms < 1:
            raise JobSetupError("--max-events, --flush-rows and --flush-ms must be >= 1")
        if args.batch_ms < 0 or args.batch_records < 1:
            raise JobSetupError("--batch-ms must be >= 0 and --batch-records >= 1")
        if args.batch_ms > 0:
            from jobs.user_state_batch import batch_jars

            batch_jars()  # compiled once; fails here, with what to do, where there is no JDK
        if args.redis_wait_replicas < -1 or args.redis_wait_timeout_ms < 1:
            raise JobSetupError("--redis-wait-replicas must be >= -1 and --redis-wait-timeout-ms >= 1")
        if args.compact_interval_min <= 0 or args.state_ttl_days <= 0 or args.state_cache_users < 0:
            raise JobSetupError("--compact-interval-min and --state-ttl-days must be > 0, "
                                "--state-cache-users >= 0")
        return {"source_topic": args.source_topic, "dlq_topic": args.dlq_topic, "max_events": args.max_events,
                "feature_repo": args.feature_repo, "flush_rows": args.flush_rows, "flush_ms": args.flush_ms,
                "feast_write": args.feast_write, "allowed_lateness_s": args.allowed_lateness_s,
                "compact_interval_min": args.compact_interval_min, "state_ttl_days": args.state_ttl_days,
                "state_cache_users": args.state_cache_users,
                "batch_ms": args.batch_ms, "batch_records": args.batch_records, "batch_fold": args.batch_fold,
                "wait_replicas": wait_replicas(args.redis_wait_replicas, args.redis),
                "wait_timeout_ms": args.redis_wait_timeout_ms}

    return run_job("user_state", __doc__, add_arguments, options, build_pipeline, argv)


if __name__ == "__main__":
    sys.exit(main())
