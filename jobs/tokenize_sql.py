"""The tokenize job's `--engine sql`: decode, validate and tokenize in the JVM, inside Flink SQL.

    events.raw (format raw) ── LATERAL TABLE(ugt_tokenize(value, topic, partition, offset, '<options>')) ──┐
        WHERE dead IS NULL ──> events.tokens (k, v)  [+ the parquet lake's columns]                        │
        WHERE dead IS NOT NULL ──> events.dlq (k, v)  <──────────────────────────────────────────────────┘

The raw bytes are read once; `ugt.flink.TokenizeRecord` (jobs/jvm/, a Java table function compiled by
infra.jars.tokenize_jvm_jars) returns exactly one row per record: the encoded token (TokenizedEvent, Confluent
wire format, keyed by user_id) or the encoded dead letter (DeadLetter with the original bytes, the same reason
codes as jobs.tokenize_logic), plus the lake's columns, and SQL splits the rows into the two Kafka sinks and
the lake. No Python runs per record. It is a port of EventTokenizer, semantic-ID cache included
(jobs/jvm/ugt/flink/SemanticIds.java: jobs.sid_cache.SemanticIdCache over Jedis, redis:// and
redis+cluster:// only); tests/jobs/test_tokenize_jvm.py holds the two to the same bytes.
"""

from __future__ import annotations

from typing import Any

from contracts.limits import MAX_ID_CHARS

JVM_FUNCTION = "ugt.flink.TokenizeRecord"


def jvm_options(registry_url: str, tokens_schema_id: int, dlq_schema_id: int, rules: dict[str, Any],
                redis_url: str = "", sid_version: str = "", job: str = "tokenize") -> str:
    """The table function's options as one SQL string literal's content: key=value;...

    redis_url '' = no semantic-ID lookup; sid_version '' = follow ugt:sid:active."""
    options = {
        "registry": registry_url, "tokens_schema_id": tokens_schema_id, "dlq_schema_id": dlq_schema_id,
        "max_record_bytes": rules["max_record_bytes"], "max_future_skew_ms": rules["max_future_skew_ms"],
        "min_event_time_ms": rules["min_event_time_ms"], "max_id_chars": MAX_ID_CHARS, "job": job,
        "redis": redis_url, "sid_version": sid_version, "unknown_items": rules.get("unknown_items", "pass"),
    }
    text = ";".join(f"{key}={value}" for key, value in options.items())
    if "'" in text or text.count(";") != len(options) - 1:
        raise ValueError(f"an option holds a quote or ';': {text!r}")
    return text


def register_output_schemas(registry_url: str, tokens_topic: str, dlq_topic: str) -> tuple[int, int]:
    """Register TokenizedEvent and DeadLetter under the output topics' subjects (as EventTokenizer does)."""
    from streams.serde import SchemaRegistryClient, schema_text, subject_for

    registry = SchemaRegistryClient(registry_url)
    return (registry.register(subject_for(tokens_topic), schema_text("tokenized_event")),
            registry.register(subject_for(dlq_topic), schema_text("dead_letter")))


def tokenized_query(source: str, options: str) -> str:
    """One row per record of `source` (value, src_topic, src_partition, src_offset): a token or a dead letter."""
    return (f"SELECT t.* FROM `{source}` AS r, LATERAL TABLE(`ugt_tokenize`(r.`value`, r.`src_topic`, "
            f"r.`src_partition`, r.`src_offset`, '{options}')) AS t")


def add_tokenize_function(env, t_env) -> None:
    """Ship jobs/jvm/ (compiled) and its Avro jars with the job and register `ugt_tokenize`."""
    from infra.jars import tokenize_jvm_jars

    env.add_jars(*[jar.resolve().as_uri() for jar in tokenize_jvm_jars()])
    t_env.execute_sql(f"CREATE TEMPORARY FUNCTION `ugt_tokenize` AS '{JVM_FUNCTION}' LANGUAGE JAVA")


def build_sql_pipeline(env, t_env, cfg) -> None:
    """events.raw -> ugt_tokenize (JVM) -> events.tokens + events.dlq (+ the lake), all in Flink SQL."""
    from jobs.common import kafka_sink_ddl, kafka_source_ddl
    from jobs.lake import LAKE_FIELDS, add_lake_sink, cluster_has_parquet

    x = cfg.extra
    add_tokenize_function(env, t_env)
    tokens_id, dlq_id = register_output_schemas(cfg.registry, x["tokens_topic"], x["dlq_topic"])
    options = jvm_options(cfg.registry, tokens_id, dlq_id, x["rules"], x["sid_redis"], x["sid_version"])
    t_env.execute_sql(kafka_source_ddl("raw_source", x["source_topic"], cfg))
    t_env.create_temporary_view("tokenized", t_env.sql_query(tokenized_query("raw_source", options)))
    t_env.execute_sql(kafka_sink_ddl("tokens_sink", x["tokens_topic"], cfg))
    t_env.execute_sql(kafka_sink_ddl("dlq_sink", x["dlq_topic"], cfg))
    statements = t_env.create_statement_set()
    statements.add_insert_sql("INSERT INTO `tokens_sink` SELECT `k`, `v` FROM `tokenized` WHERE `dead` IS NULL")
    statements.add_insert_sql("INSERT INTO `dlq_sink` SELECT `k`, `v` FROM `tokenized` WHERE `dead` IS NOT NULL")
    if x["lake"]:
        columns = ", ".join(f"`{name}`" for name, _ in LAKE_FIELDS)
        t_env.create_temporary_view("tokens_out", t_env.sql_query(
            f"SELECT {columns} FROM `tokenized` WHERE `dead` IS NULL"))
        add_lake_sink(env, t_env, statements, "tokens_out", x["lake"], ship_jars=cfg.local or not cluster_has_parquet())
    statements.attach_as_datastream()
