"""PyFlink job `feedback_join`: events.impressions + events.tokens -> per-arm, per-window experiment metrics.

    <pyflink>/bin/flink run -py jobs/feedback_join_job.py [--bounded] [--attribution-min 30] ...   # on the cluster
    python jobs/feedback_join_job.py --local [--bounded] ...                                     # in-process

Wiring only; the logic is jobs/feedback_join_logic.py, the operators jobs/operators/feedback_join_fn.py.
Output: JSON rows on experiments.metrics (keyed `<experiment>:<arm>`) and one Redis hash per (experiment, arm,
window) (contracts.redis_keys.experiment_window_key) for `ugt experiment report` and dashboards.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from infra.settings import get_settings
    from jobs.common import add_common_arguments

    topics = get_settings().topics
    parser.add_argument("--impressions-topic", default=topics.impressions, help="impressions (default: %(default)s)")
    parser.add_argument("--events-topic", default=topics.tokens,
                        help="user events, tokenized: validated, deduplicable by event_id, keyed by user "
                             "(default: %(default)s)")
    parser.add_argument("--metrics-topic", default=topics.experiment_metrics,
                        help="output: JSON metrics per (experiment, arm, window) (default: %(default)s)")
    parser.add_argument("--dlq-topic", default=topics.dlq, help="late and undecodable records (default: %(default)s)")
    g = parser.add_argument_group("attribution and windows")
    g.add_argument("--attribution-min", type=float, default=30.0,
                   help="an interaction counts for an impression up to this long after it was served "
                        "(event time; default: %(default)s)")
    g.add_argument("--window-min", type=float, default=5.0,
                   help="metrics are reported per tumbling window of served_at this long (default: %(default)s)")
    g.add_argument("--out-of-orderness-s", type=float, default=30.0,
                   help="watermark lag behind the newest event time of each input: records later than this are "
                        "late (DLQ, counted) (default: %(default)s)")
    g.add_argument("--idle-s", type=float, default=60.0,
                   help="an input silent this long stops holding the watermark back (default: %(default)s)")
    g.add_argument("--ctr-k", default="1,5,10", help="CTR@k cut-offs, comma-separated (default: %(default)s)")
    g.add_argument("--conversions", default="PURCHASE",
                   help="actions that convert an impression, comma-separated (default: %(default)s)")
    g.add_argument("--completion-share", type=float, default=0.9,
                   help="an attributed event completes its item when its duration_s is at least this share of the "
                        "item's length (tokens' item_length_s, from the event's context) (default: %(default)s)")
    g.add_argument("--completion-actions", default="RATE",
                   help="when an event lacks a duration or the item's length: actions that complete the item, "
                        "comma-separated; '' = none (default: %(default)s)")
    g.add_argument("--dedup-hours", type=float, default=24.0,
                   help="event and request ids remembered this long for deduplication (default: %(default)s)")
    g.add_argument("--update-grace-min", type=float, default=60.0,
                   help="an emitted window is emitted again, whole, when outcomes still reach it this long after "
                        "(a join instance that was idle); later ones are dropped and counted (default: %(default)s)")
    g.add_argument("--state-ttl-days", type=float, default=30.0,
                   help="Flink state TTL of an idle user or arm (default: %(default)s)")
    g.add_argument("--redis-ttl-days", type=float, default=30.0,
                   help="TTL of the metric hashes in Redis; 0 = none (default: %(default)s)")
    add_common_arguments(parser, "feedback_join")


def watermarks(cfg):
    """Bounded-out-of-orderness watermarks per input, from the time the decoder put in each row."""
    from pyflink.common import Duration, WatermarkStrategy

    from jobs.operators.feedback_join_fn import RecordTime

    x = cfg.extra
    # the assigner last: PyFlink's with_idleness returns a strategy without the Python assigner
    return WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(x["out_of_orderness_ms"])) \
        .with_idleness(Duration.of_millis(x["idle_ms"])) \
        .with_timestamp_assigner(RecordTime())


def build_pipeline(env, t_env, cfg) -> None:
    """Each input decoded and given its own watermarks (the union's watermark is the slower input's), keyed by
    user for the join, by (experiment, arm) for the metrics; JSON rows to Kafka, hashes to Redis (in the
    operator), late and bad records to the DLQ."""
    from pyflink.common import Types

    from jobs.common import add_kafka_sink, kafka_source, key_value_type
    from jobs.feedback_join_logic import JoinConfig
    from jobs.operators.feedback_join_fn import (
        DLQ_TAG,
        EVENT,
        IMPRESSION,
        ArmMetricsFunction,
        DecodeFunction,
        FeedbackJoinFunction,
        arm_key,
        decoded_type,
    )

    x = cfg.extra
    join = x["join"]
    config = JoinConfig(**{**join, "ctr_ks": tuple(join["ctr_ks"]), "conversions": frozenset(join["conversions"]),
                           "completion_actions": frozenset(join["completion_actions"])})
    decoded = []
    for kind, table, topic in ((IMPRESSION, "impressions_source", x["impressions_topic"]),
                               (EVENT, "events_source", x["events_topic"])):
        stream = kafka_source(t_env, table, topic, cfg) \
            .process(DecodeFunction(kind, cfg.registry, x["dlq_topic"]), output_type=decoded_type()) \
            .name(f"decode-{kind}s").uid(f"decode-{kind}s")
        decoded.append(stream)
    timed = [s.assign_timestamps_and_watermarks(watermarks(cfg)) for s in decoded]
    outcomes = timed[0].union(timed[1]) \
        .key_by(lambda row: row[0], key_type=Types.STRING()) \
        .process(FeedbackJoinFunction(config, cfg.registry, x["dlq_topic"], x["state_ttl_ms"]),
                 output_type=Types.PICKLED_BYTE_ARRAY()) \
        .name("feedback-join").uid("feedback-join")
    metrics = outcomes.key_by(arm_key, key_type=Types.STRING()) \
        .process(ArmMetricsFunction(config, cfg.redis, x["redis_ttl_s"], x["state_ttl_ms"]),
                 output_type=key_value_type()) \
        .name("arm-metrics").uid("arm-metrics")
    statements = t_env.create_statement_set()
    add_kafka_sink(t_env, statements, metrics, "metrics_sink", x["metrics_topic"], cfg)
    dead = outcomes.get_side_output(DLQ_TAG).union(*(s.get_side_output(DLQ_TAG) for s in decoded))
    add_kafka_sink(t_env, statements, dead, "dlq_sink", x["dlq_topic"], cfg)
    statements.attach_as_datastream()


def job_options(args: argparse.Namespace) -> dict:
    """The job's own options, checked (JobSetupError says what is wrong)."""
    from jobs.common import JobSetupError
    from jobs.feedback_join_logic import JoinConfig

    try:
        ks = tuple(sorted({int(k) for k in args.ctr_k.split(",") if k.strip()}))
        join = JoinConfig(attribution_ms=int(args.attribution_min * 60_000),
                          metric_window_ms=int(args.window_min * 60_000), ctr_ks=ks,
                          conversions=frozenset(a.strip().upper() for a in args.conversions.split(",") if a.strip()),
                          dedup_horizon_ms=int(args.dedup_hours * 3600_000),
                          update_grace_ms=int(args.update_grace_min * 60_000),
                          completion_share=args.completion_share,
                          completion_actions=frozenset(a.strip().upper() for a in args.completion_actions.split(",")
                                                       if a.strip()))
    except ValueError as exc:
        raise JobSetupError(str(exc)) from exc
    if args.out_of_orderness_s < 0 or args.idle_s <= 0 or args.state_ttl_days <= 0 or args.redis_ttl_days < 0:
        raise JobSetupError("--out-of-orderness-s and --redis-ttl-days must be >= 0, --idle-s and "
                            "--state-ttl-days > 0")
    return {
        "impressions_topic": args.impressions_topic, "events_topic": args.events_topic,
        "metrics_topic": args.metrics_topic, "dlq_topic": args.dlq_topic,
        "join": {**vars(join), "ctr_ks": list(join.ctr_ks), "conversions": sorted(join.conversions),
                 "completion_actions": sorted(join.completion_actions)},
        "out_of_orderness_ms": int(args.out_of_orderness_s * 1000), "idle_ms": int(args.idle_s * 1000),
        "state_ttl_ms": int(args.state_ttl_days * 86_400_000), "redis_ttl_s": int(args.redis_ttl_days * 86_400),
    }


def main(argv: list[str] | None = None) -> int:
    from jobs.common import run_job

    return run_job("feedback_join", __doc__, add_arguments, job_options, build_pipeline, argv)


if __name__ == "__main__":
    sys.exit(main())
