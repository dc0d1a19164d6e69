"""Shared Flink wiring of the UGT jobs: options, the execution environment, Kafka byte sources and sinks.

Kafka I/O goes through Flink's Table API Kafka connector with the `raw` format, converted to and from
DataStreams: PyFlink's DataStream `KafkaSource` only offers value-only deserializers (no partition /
offset, which every dead letter must carry), and its `KafkaSink` serializes key and value from the same
element. The `raw` table format gives the value bytes untouched plus the `topic` / `partition` /
`offset` metadata columns, and a sink table with `key.format=raw` writes a separate key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.settings import REPO_ROOT, Settings, get_settings

log = logging.getLogger("ugt.jobs")
CONNECTOR_JAR_NAME = "flink-sql-connector-kafka-5.0.0-2.2.jar"
STARTUP_MODES = {"earliest": "earliest-offset", "latest": "latest-offset", "group": "group-offsets"}
DELIVERY = ("at-least-once", "exactly-once", "none")
# The default checkpoint interval per --delivery. Under exactly-once the Kafka sink's transactions commit when a
# checkpoint completes, so a downstream read_committed job (user_state) sees an event only after the next
# checkpoint: the interval bounds event -> visible state (docs/JOBS.md, "Exactly-once freshness").
DEFAULT_CHECKPOINT_MS = {"at-least-once": 10_000, "none": 10_000, "exactly-once": 250}


class JobSetupError(RuntimeError):
    """The job cannot start (missing jar, bad option); the message says what to do."""


@dataclass(frozen=True)
class JobConfig:
    """Options every UGT job shares (flat, typed; logged whole at start)."""

    job_name: str
    bootstrap: str
    registry: str
    redis: str
    group_id: str
    parallelism: int = 1
    bounded: bool = False
    startup: str = "group"  # earliest | latest | group (committed offsets, else earliest)
    local: bool = False
    checkpoint_interval_ms: int = 10_000
    checkpoint_dir: str = ""
    checkpoint_min_pause_ms: int = 0
    unaligned_checkpoints: bool = False
    delivery: str = "at-least-once"
    execution_mode: str = "thread"  # PyFlink python.execution-mode: thread (pemja) | process (Beam workers)
    bundle_size: int = 1000
    state_cache_size: int = 10_000
    connector_jar: str = ""
    python: str = sys.executable
    extra: dict[str, Any] = field(default_factory=dict)


def add_common_arguments(parser: argparse.ArgumentParser, job_name: str) -> None:
    """The options of every job; defaults come from infra.settings."""
    s = get_settings()
    g = parser.add_argument_group("common job options")
    g.add_argument("--bootstrap", default=s.kafka_bootstrap, help="Kafka bootstrap servers (default: %(default)s)")
    g.add_argument("--registry", default=s.registry_url, help="Schema Registry URL (default: %(default)s)")
    g.add_argument("--redis", default=s.redis_url, help="Redis URL of the Feast online store (default: %(default)s)")
    g.add_argument("--group-id", default=f"ugt-{job_name}", help="Kafka consumer group (default: %(default)s)")
    g.add_argument("--parallelism", type=int, default=s.job_parallelism,
                   help="operator parallelism (default: %(default)s; UGT_JOB_PARALLELISM, 2 in the cluster profile)")
    g.add_argument("--bounded", action="store_true",
                   help="stop at the latest offsets present at start (tests, backfills); else run forever")
    g.add_argument("--startup", choices=sorted(STARTUP_MODES), default="group",
                   help="where to start reading: committed group offsets (earliest when none), earliest or latest")
    g.add_argument("--local", action="store_true",
                   help="run in an in-process mini-cluster (no Flink cluster needed)")
    g.add_argument("--checkpoint-interval-ms", type=int, default=None,
                   help="checkpoint interval; 0 disables checkpointing (default: 10000, or 250 with --delivery "
                        "exactly-once, whose output becomes visible only when a checkpoint completes)")
    g.add_argument("--checkpoint-min-pause-ms", type=int, default=None,
                   help="execution.checkpointing.min-pause: the least time between the end of one checkpoint and "
                        "the start of the next, so slow checkpoints cannot run back to back (default: half the "
                        "interval)")
    g.add_argument("--unaligned-checkpoints", action="store_true",
                   help="execution.checkpointing.unaligned.enabled: barriers overtake buffered records, so a "
                        "backpressured job still checkpoints (and commits exactly-once output) on time")
    g.add_argument("--checkpoint-dir", default=str(s.var_dir / "flink" / "checkpoints"),
                   help="checkpoint storage folder (default: %(default)s)")
    g.add_argument("--delivery", choices=DELIVERY, default="at-least-once",
                   help="Kafka sink guarantee; exactly-once makes output visible only at checkpoints "
                        "(default: %(default)s)")
    g.add_argument("--execution-mode", choices=("thread", "process"), default="thread",
                   help="PyFlink python.execution-mode: thread runs Python in the JVM via pemja (~10x faster "
                        "keyed state), process in separate Beam workers (default: %(default)s)")
    g.add_argument("--bundle-size", type=int, default=1000, help="python.fn-execution.bundle.size")
    g.add_argument("--state-cache-size", type=int, default=10_000, help="python.state.cache-size")
    g.add_argument("--connector-jar", default="",
                   help=f"path of {CONNECTOR_JAR_NAME} (default: the one `ugt stack up` fetched)")


def checkpoint_interval_ms(args: argparse.Namespace) -> int:
    """--checkpoint-interval-ms, else the default of the --delivery profile (DEFAULT_CHECKPOINT_MS)."""
    explicit = getattr(args, "checkpoint_interval_ms", None)
    return DEFAULT_CHECKPOINT_MS[args.delivery] if explicit is None else explicit


def config_from_args(args: argparse.Namespace, job_name: str, **extra: Any) -> JobConfig:
    if args.parallelism < 1:
        raise JobSetupError(f"--parallelism must be >= 1, got {args.parallelism}")
    interval = checkpoint_interval_ms(args)
    if interval < 0:
        raise JobSetupError(f"--checkpoint-interval-ms must be >= 0, got {interval}")
    if args.delivery == "exactly-once" and interval == 0:
        raise JobSetupError("--delivery exactly-once commits Kafka transactions on checkpoints: "
                            "set --checkpoint-interval-ms > 0")
    min_pause = interval // 2 if args.checkpoint_min_pause_ms is None else args.checkpoint_min_pause_ms
    if min_pause < 0:
        raise JobSetupError(f"--checkpoint-min-pause-ms must be >= 0, got {min_pause}")
    return JobConfig(
        job_name=job_name,
        bootstrap=args.bootstrap,
        registry=args.registry,
        redis=args.redis,
        group_id=args.group_id,
        parallelism=args.parallelism,
        bounded=args.bounded,
        startup=args.startup,
        local=args.local,
        checkpoint_interval_ms=interval,
        checkpoint_dir=str(Path(args.checkpoint_dir).resolve()),
        checkpoint_min_pause_ms=min_pause,
        unaligned_checkpoints=args.unaligned_checkpoints,
        delivery=args.delivery,
        execution_mode=args.execution_mode,
        bundle_size=args.bundle_size,
        state_cache_size=args.state_cache_size,
        connector_jar=str(connector_jar(args.connector_jar or None)),
        python=python_executable(),
        extra=dict(extra),
    )


def python_executable() -> str:
    """The venv's python (workers must import pyflink, feast and this repo's packages)."""
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def site_packages(python: str) -> list[str]:
    """site-packages folders of the interpreter `python` (a venv's own, not its base's)."""
    if python == sys.executable:  # not resolve(): a venv's python links to its base interpreter
        import site

        return [p for p in site.getsitepackages() if Path(p).is_dir()]
    import subprocess

    out = subprocess.run([python, "-c", "import site; print(chr(10).join(site.getsitepackages()))"],
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p and Path(p).is_dir()]


def connector_jar(explicit: str | None = None) -> Path:
    """The Flink SQL Kafka connector jar: --connector-jar, else the stack's, else the cache."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("UGT_KAFKA_CONNECTOR_JAR"):
        candidates.append(Path(os.environ["UGT_KAFKA_CONNECTOR_JAR"]))
    try:
        from infra.jars import kafka_connector_jar  # the stack owns where jars live

        candidates.append(Path(kafka_connector_jar()))
    except Exception:  # stack module missing or jar not fetched yet: fall back to the cache path
        pass
    candidates.append(get_settings().cache_dir / "lib" / "flink-connectors" / CONNECTOR_JAR_NAME)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise JobSetupError(
        f"{CONNECTOR_JAR_NAME} not found (looked at {', '.join(map(str, candidates))}); run `ugt stack up` "
        "(it fetches the jar from Maven Central) or pass --connector-jar"
    )


def flink_python_jar() -> Path:
    """opt/flink-python-<version>.jar of the apache-flink package."""
    import pyflink

    found = sorted((Path(pyflink.__file__).parent / "opt").glob("flink-python-*.jar"))
    if not found:
        raise JobSetupError("flink-python jar not found in the apache-flink package's opt/; reinstall apache-flink")
    return found[-1]


def cluster_lib_dir() -> Path:
    """The lib/ folder the cluster's scripts put on the JVM classpath (FLINK_LIB_DIR, else FLINK_HOME/lib)."""
    import pyflink

    home = os.environ.get("FLINK_HOME") or str(Path(pyflink.__file__).parent)
    return Path(os.environ.get("FLINK_LIB_DIR") or Path(home) / "lib")


def cluster_has_flink_python() -> bool:
    return any(cluster_lib_dir().glob("flink-python-*.jar"))


def cluster_has_connector(jar: str) -> bool:
    """The cluster's lib/ holds this very connector jar (`ugt stack up` links it there), so a job need not ship it.

    Loaded once per TaskManager, the Kafka client's classes stay JIT-compiled across job submissions; shipped
    with each job, every job's class loader loads and compiles them again (~7 CPU-s of C2 per job on this box).
    """
    linked = cluster_lib_dir() / CONNECTOR_JAR_NAME
    return linked.exists() and bool(jar) and linked.resolve() == Path(jar).resolve()


def effective_execution_mode(cfg: JobConfig) -> str:
    """thread needs pemja loaded once per TaskManager JVM, i.e. flink-python in the cluster's lib/.

    Shipped with each job instead, every job's class loader loads pemja's native library again, which
    Java 17 refuses (pemja: NoSuchFieldException loadedLibraryNames) from the second job on: use process mode.
    """
    if cfg.execution_mode == "thread" and not cfg.local and not cluster_has_flink_python():
        return "process"
    return cfg.execution_mode


def under_flink_client() -> bool:
    """True when started by `flink run -py` (the Flink client runs the script with a gateway port)."""
    return "PYFLINK_GATEWAY_PORT" in os.environ


def flink_configuration(cfg: JobConfig) -> dict[str, str]:
    """The Flink options the jobs set, as strings (also logged and documented in docs/JOBS.md)."""
    jars = [] if not cfg.local and cluster_has_connector(cfg.connector_jar) else [Path(cfg.connector_jar).as_uri()]
    if not cfg.local and not cluster_has_flink_python():
        # the pip package keeps flink-python in opt/, outside the cluster's lib/: without it on the job's
        # classpath the JobManager cannot deserialize the Python operators of the submitted graph
        jars.append(flink_python_jar().as_uri())
    conf = {
        "pipeline.name": cfg.job_name,
        "python.executable": cfg.python,
        "python.client.executable": cfg.python,
        "python.execution-mode": effective_execution_mode(cfg),
        "python.fn-execution.bundle.size": str(cfg.bundle_size),
        "python.state.cache-size": str(cfg.state_cache_size),
        "python.metric.enabled": "true",
        "execution.runtime-mode": "STREAMING",
        # chained operators hand records over without a serializer copy: every operator of these jobs reads its
        # input once and keeps none (Python operators convert to Python objects; SQL and the sinks encode at once)
        "pipeline.object-reuse": "true",
        "parallelism.default": str(cfg.parallelism),
        # thread mode embeds CPython in the JVM (pemja), which knows only the base interpreter's paths:
        # give it the venv's site-packages (pyflink, pemja, feast) and this repo
        "python.pythonpath": os.pathsep.join([str(REPO_ROOT), *site_packages(cfg.python)]),
    }
    if jars:
        conf["pipeline.jars"] = ";".join(jars)
    if cfg.checkpoint_interval_ms > 0:
        conf.update({
            "execution.checkpointing.interval": f"{cfg.checkpoint_interval_ms} ms",
            "execution.checkpointing.min-pause": f"{cfg.checkpoint_min_pause_ms} ms",
            "execution.checkpointing.unaligned.enabled": str(cfg.unaligned_checkpoints).lower(),
            "execution.checkpointing.mode": "EXACTLY_ONCE",
            "execution.checkpointing.dir": Path(cfg.checkpoint_dir).as_uri(),
            "execution.checkpointing.storage": "filesystem",
            "state.backend.type": "hashmap",
        })
    return conf


def create_env(cfg: JobConfig):  # -> (StreamExecutionEnvironment, StreamTableEnvironment)
    """The execution environment: the cluster under `flink run`, an in-process mini-cluster with --local."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    if not cfg.local and not under_flink_client():
        raise JobSetupError(
            f"{cfg.job_name}: submit it to the cluster with `<pyflink>/bin/flink run -py jobs/{cfg.job_name}.py ...` "
            f"(or `ugt jobs submit {cfg.job_name}`), or pass --local to run it in-process"
        )
    if effective_execution_mode(cfg) != cfg.execution_mode:
        log.warning("flink-python is not in the cluster's lib/ (%s): python.execution-mode thread would fail from "
                    "the second job on; using process mode (see docs/JOBS.md)", cluster_lib_dir())
    configuration = Configuration()
    for key, value in flink_configuration(cfg).items():
        configuration.set_string(key, value)
    if cfg.checkpoint_interval_ms > 0:
        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    env = StreamExecutionEnvironment.get_execution_environment(configuration)
    env.set_parallelism(cfg.parallelism)
    if cfg.checkpoint_interval_ms > 0:
        env.enable_checkpointing(cfg.checkpoint_interval_ms)
    t_env = StreamTableEnvironment.create(env)
    return env, t_env


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _with(options: dict[str, str]) -> str:
    return ",\n  ".join(f"{_quote(k)} = {_quote(v)}" for k, v in options.items())


def kafka_source_ddl(table: str, topic: str, cfg: JobConfig, with_key: bool = False) -> str:
    """A Kafka table of raw value bytes (with_key: then the raw key bytes `k`) plus where each came from
    (topic, partition, offset)."""
    options = {
        "connector": "kafka",
        "topic": topic,
        "properties.bootstrap.servers": cfg.bootstrap,
        "properties.group.id": cfg.group_id,
        "properties.auto.offset.reset": "earliest",
        # only committed records of transactional (exactly-once) producers
        "properties.isolation.level": "read_committed",
        "scan.startup.mode": STARTUP_MODES[cfg.startup],
    }
    if with_key:
        options.update({"key.format": "raw", "key.fields": "k", "value.format": "raw",
                        "value.fields-include": "EXCEPT_KEY"})
    else:
        options["format"] = "raw"
    if cfg.bounded:
        options["scan.bounded.mode"] = "latest-offset"
    return (
        f"CREATE TEMPORARY TABLE `{table}` (\n"
        "  `value` BYTES,\n" + ("  `k` BYTES,\n" if with_key else "") +
        "  `src_topic` STRING METADATA FROM 'topic' VIRTUAL,\n"
        "  `src_partition` INT METADATA FROM 'partition' VIRTUAL,\n"
        "  `src_offset` BIGINT METADATA FROM 'offset' VIRTUAL\n"
        f") WITH (\n  {_with(options)}\n)"
    )


def kafka_sink_ddl(table: str, topic: str, cfg: JobConfig) -> str:
    """A Kafka table that writes a raw key and a raw value."""
    options = {
        "connector": "kafka",
        "topic": topic,
        "properties.bootstrap.servers": cfg.bootstrap,
        "key.format": "raw",
        "key.fields": "k",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        "sink.delivery-guarantee": cfg.delivery,
    }
    if cfg.delivery == "exactly-once":
        options["sink.transactional-id-prefix"] = f"{cfg.group_id}-{table}"
        # must not exceed the broker's transaction.max.timeout.ms (15 min by default)
        options["properties.transaction.timeout.ms"] = "900000"
        # reuse a small pool of transactional ids instead of a new one per checkpoint (INCREMENTING): at a
        # checkpoint every 250 ms that would be 345,600 ids a day for the broker to keep (needs Kafka 3.0+)
        options["sink.transaction-naming-strategy"] = "POOLING"
    return (
        f"CREATE TEMPORARY TABLE `{table}` (\n  `k` BYTES,\n  `v` BYTES\n"
        f") WITH (\n  {_with(options)}\n)"
    )


def source_row_type():
    """Type of the rows the sources yield: (value, src_topic, src_partition, src_offset)."""
    from pyflink.common import Types

    return Types.ROW_NAMED(
        ["value", "src_topic", "src_partition", "src_offset"],
        [Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.STRING(), Types.INT(), Types.LONG()],
    )


def key_value_type():
    """Type of the rows the sinks take: (k, v), both bytes."""
    from pyflink.common import Types

    return Types.ROW_NAMED(["k", "v"], [Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE())])


def kafka_source(t_env, table: str, topic: str, cfg: JobConfig, with_key: bool = False):
    """A DataStream of Row(value, src_topic, src_partition, src_offset) read from `topic`;
    with_key: Row(value, k, src_topic, src_partition, src_offset), k the record's key bytes (None if unkeyed)."""
    t_env.execute_sql(kafka_source_ddl(table, topic, cfg, with_key))
    return t_env.to_data_stream(t_env.from_path(table))


def keyed_kafka_source(t_env, table: str, topic: str, cfg: JobConfig):
    """A KeyedStream of Row(value, k, src_topic, src_partition, src_offset) keyed by the record key as text
    ('' for an unkeyed record), partitioned without a Python call.

    PyFlink's ``key_by`` runs a Python function per record only to wrap it as Row(key, record); here SQL builds
    that row and the JVM keys it with flink-python's own KeyByKeySelector, so the keyed Python operator sees
    exactly what ``key_by(<key text>, Types.STRING())`` gives it (same key type, same key groups) at one
    Java<->Python crossing less per record.
    """
    from pyflink.common import Types
    from pyflink.datastream.data_stream import DataStream, KeyedStream
    from pyflink.java_gateway import get_gateway

    t_env.execute_sql(kafka_source_ddl(table, topic, cfg, with_key=True))
    keyed = t_env.sql_query(
        "SELECT COALESCE(CAST(`k` AS STRING), '') AS `key`, "
        f"ROW(`value`, `k`, `src_topic`, `src_partition`, `src_offset`) AS `record` FROM `{table}`")
    record_type = Types.ROW_NAMED(
        ["value", "k", "src_topic", "src_partition", "src_offset"],
        [Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.STRING(), Types.INT(),
         Types.LONG()])
    j_stream = t_env._j_tenv.toDataStream(keyed._j_table)
    # the rows are plain positional Rows: typed as RowTypeInfo, which the keyed Python operator requires
    j_stream.getTransformation().setOutputType(Types.ROW([Types.STRING(), record_type]).get_java_type_info())
    selector = get_gateway().jvm.org.apache.flink.streaming.api.functions.python.KeyByKeySelector()
    j_keyed = j_stream.keyBy(selector, Types.ROW([Types.STRING()]).get_java_type_info())
    return KeyedStream(j_keyed, record_type, DataStream(j_stream))


def add_kafka_sink(t_env, statements, stream, table: str, topic: str, cfg: JobConfig) -> None:
    """Write a DataStream of Row(k, v) to `topic` (added to the statement set `statements`)."""
    t_env.execute_sql(kafka_sink_ddl(table, topic, cfg))
    statements.add_insert(table, t_env.from_data_stream(stream))


def settings_for(cfg: JobConfig) -> Settings:
    """Settings whose redis_url is the job's --redis (the Feast store is opened with it)."""
    return _JobSettings(redis_override=cfg.redis)


@dataclass(frozen=True)
class _JobSettings(Settings):
    redis_override: str = ""

    @property
    def redis_url(self) -> str:  # type: ignore[override]
        return self.redis_override or super().redis_url


def describe(cfg: JobConfig) -> str:
    """One line per option, for the job's start-up log."""
    lines = [f"{cfg.job_name} job options:"]
    for key, value in sorted(vars(cfg).items()):
        lines.append(f"  {key} = {value}")
    return "\n".join(lines)


def discard(stream) -> None:
    """End a stream whose operator does its own I/O (Flink runs only what reaches a sink)."""
    from pyflink.datastream.connectors.base import Sink
    from pyflink.java_gateway import get_gateway

    j_sink = get_gateway().jvm.org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink()
    stream.sink_to(Sink(j_sink)).name("discard")


def run_job(
    job_name: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    job_options: Callable[[argparse.Namespace], dict[str, Any]],
    build_pipeline: Callable[[Any, Any, JobConfig], None],
    argv: list[str] | None = None,
) -> int:
    """The `main` every job shares: parse, check options (JobSetupError -> exit 2), build, execute.

    ``job_options(args)`` returns the job's own options for ``JobConfig.extra`` and raises JobSetupError
    on a bad one, so every job fails at start the same way, with what is wrong.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=f"flink run -py jobs/{job_name}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, job_name, **job_options(args))
        env, t_env = create_env(cfg)
    except JobSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger(f"ugt.jobs.{job_name}").info(describe(cfg))
    build_pipeline(env, t_env, cfg)
    env.execute(cfg.job_name)
    return 0
