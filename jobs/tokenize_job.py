"""PyFlink job `tokenize`: events.raw (Avro UserEvent) -> events.tokens (Avro TokenizedEvent) + events.dlq.

    <pyflink>/bin/flink run -py jobs/tokenize_job.py [--bounded] [--parallelism N] ...   # on the cluster
    python jobs/tokenize_job.py --local [--bounded] ...                                 # in-process

Wiring only; the logic is jobs/tokenize_logic.py, the operator jobs/operators/tokenize_fn.py.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from contracts.tokenizer import MAX_FUTURE_SKEW_MS
    from infra.settings import get_settings
    from jobs.common import add_common_arguments
    from jobs.lake import default_lake_dir
    from streams.serde import MAX_RECORD_BYTES

    topics = get_settings().topics
    parser.add_argument("--source-topic", default=topics.raw, help="input topic (default: %(default)s)")
    parser.add_argument("--tokens-topic", default=topics.tokens, help="output topic (default: %(default)s)")
    parser.add_argument("--dlq-topic", default=topics.dlq, help="dead-letter topic (default: %(default)s)")
    g = parser.add_argument_group("tokens and what is dead-lettered")
    g.add_argument("--sid-version", default="",
                   help="semantic-ID store version to read (ugt:sid:item:<version>); default: follow "
                        "ugt:sid:active at --redis, reloading when it flips")
    g.add_argument("--no-semantic-ids", action="store_true",
                   help="do not look items up in the semantic-ID store (tokens carry no semantic IDs)")
    g.add_argument("--unknown-items", choices=("pass", "dlq"), default="pass",
                   help="an item the store has no ID for: pass (token without semantic IDs) or dlq "
                        "(UNKNOWN_ITEM dead letter; needs an active or given version) (default: %(default)s)")
    g.add_argument("--max-future-skew-ms", type=int, default=MAX_FUTURE_SKEW_MS,
                   help="event_time later than now + this is FAR_FUTURE (default: %(default)s = 24 h)")
    g.add_argument("--min-event-time", default="1990-01-01",
                   help="event_time before this (YYYY-MM-DD UTC or epoch ms) is TOO_OLD; ML-1M is from "
                        "2000-2003, ML-100K from 1997 (default: %(default)s)")
    g.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help="records larger than this are OVERSIZED (default: %(default)s, the maximum)")
    g.add_argument("--engine", choices=("python", "sql"), default="sql",
                   help="sql: decode, validate and tokenize in the JVM inside Flink SQL (jobs/tokenize_sql.py, "
                        "jobs/jvm/; ~0.3-0.5x the Flink CPU per event, docs/JOBS.md); python: the Python operator "
                        "per record (jobs/tokenize_logic.py; also rediss:// semantic-ID stores) (default: %(default)s)")
    g.add_argument("--lake", default=str(default_lake_dir()),
                   help="parquet data lake folder (partitions dt=YYYY-MM-DD, files commit on checkpoints); "
                        "'' = no lake (default: %(default)s)")
    add_common_arguments(parser, "tokenize")

def build_pipeline(env, t_env, cfg) -> None:
    """events.raw -> TokenizeFunction -> events.tokens; side outputs -> events.dlq and the parquet lake."""
    from jobs.common import add_kafka_sink, kafka_sink_ddl, kafka_source, key_value_type
    from jobs.lake import add_lake_sink, cluster_has_parquet, token_lake_row_type
    from jobs.operators.tokenize_fn import DLQ_TAG, TokenizeFunction
    from jobs.tokenize_logic import Rules

    x = cfg.extra
    if x["engine"] == "sql":
        from jobs.tokenize_sql import build_sql_pipeline

        build_sql_pipeline(env, t_env, cfg)
        return
    rules = Rules(**x["rules"])
    raw = kafka_source(t_env, "raw_source", x["source_topic"], cfg)
    fn = TokenizeFunction(cfg.registry, x["tokens_topic"], x["dlq_topic"], rules=rules,
                          redis_url=x["sid_redis"], sid_version=x["sid_version"], lake=bool(x["lake"]))
    out_type = token_lake_row_type() if x["lake"] else key_value_type()
    tokens = raw.process(fn, output_type=out_type).name("tokenize").uid("tokenize")
    statements = t_env.create_statement_set()
    if x["lake"]:  # one row per token: (k, v) to Kafka, the rest to parquet, split in SQL
        t_env.create_temporary_view("tokens_out", t_env.from_data_stream(tokens))
        t_env.execute_sql(kafka_sink_ddl("tokens_sink", x["tokens_topic"], cfg))
        statements.add_insert_sql("INSERT INTO `tokens_sink` SELECT `k`, `v` FROM `tokens_out`")
        add_lake_sink(env, t_env, statements, "tokens_out", x["lake"],
                      ship_jars=cfg.local or not cluster_has_parquet())
    else:
        add_kafka_sink(t_env, statements, tokens, "tokens_sink", x["tokens_topic"], cfg)
    add_kafka_sink(t_env, statements, tokens.get_side_output(DLQ_TAG), "dlq_sink", x["dlq_topic"], cfg)
    statements.attach_as_datastream()

def job_options(args: argparse.Namespace) -> dict:
    """The job's own options, checked (JobSetupError says what is wrong)."""
    from jobs.common import JobSetupError
    from jobs.tokenize_logic import Rules, parse_time_floor, resolve_sid_version

    try:
        rules = Rules(max_record_bytes=args.max_record_bytes, max_future_skew_ms=args.max_future_skew_ms,
                      min_event_time_ms=parse_time_floor(args.min_event_time), unknown_items=args.unknown_items)
    except ValueError as exc:
        raise JobSetupError(str(exc)) from exc
    if args.no_semantic_ids and args.unknown_items == "dlq":
        raise JobSetupError("--unknown-items dlq needs the semantic-ID store; drop --no-semantic-ids")
    if args.engine == "sql" and not args.no_semantic_ids and not args.redis.startswith(("redis://", "redis+cluster://")):
        raise JobSetupError(f"--engine sql reads semantic IDs over redis:// or redis+cluster:// only, not {args.redis}: "
                            "use --engine python, or --no-semantic-ids")
    if args.unknown_items == "dlq":
        try:
            resolve_sid_version(args.redis, args.sid_version)
        except ValueError as exc:
            raise JobSetupError(str(exc)) from exc
    if args.lake and args.checkpoint_interval_ms == 0:
        raise JobSetupError("the lake's files commit on checkpoints: set --checkpoint-interval-ms > 0 or --lake ''")
    return {
        "source_topic": args.source_topic, "tokens_topic": args.tokens_topic, "dlq_topic": args.dlq_topic,
        "rules": vars(rules), "sid_redis": "" if args.no_semantic_ids else args.redis,
        "sid_version": args.sid_version, "lake": args.lake,
        "engine": args.engine,
    }

def main(argv: list[str] | None = None) -> int:
    from jobs.common import run_job

    def options(args: argparse.Namespace) -> dict:
        return job_options(args)

    return run_job("tokenize", __doc__, add_arguments, options, build_pipeline, argv)


if __name__ == "__main__":
    sys.exit(main())
