"""What one Java <-> Python crossing costs in PyFlink, per record and in micro-batches (the nearline bottleneck).

    .venv/bin/python -m bench.pyflink_boundary [--events 600000] [--small 30000] [--repeat 1]

The nearline jobs spend ~200 µs of TaskManager CPU per event (bench/results/nearline.json) and their own
Python logic ~30-45 µs of it (bench.tokenize_record, bench.user_state_cost). This bench isolates the rest that
Python adds: the same trivial work (slice a 60-byte value, double an id) behind each shape a PyFlink job can
take, on an in-process mini-cluster, Flink's datagen source, a blackhole sink, parallelism 1, no Kafka:

  * jvm (the anchor): the same projection in Flink SQL, no Python;
  * per-record: thread mode (the jobs' mode), one ProcessFunction call per record, Row(k, v, x) out;
  * per-record-lake: the same with tokenize's 18-column output row (k, v + jobs.lake.LAKE_FIELDS);
  * window-only: a 50-ms processing-time window that ARRAY_AGGs the records and UNNESTs them again, no Python
    (the JVM cost of batching in SQL);
  * batch-bytes: that window, one Python call per batch, ARRAY<BYTES> + ARRAY<BIGINT> in, ARRAY<BYTES> out,
    UNNEST in SQL;
  * batch-kv: the same batches, (k, v) pairs out as ARRAY<ROW<k BYTES, v BYTES>> (a Kafka sink's shape);
  * batch-rows: the same batches, the 18-column rows out as ARRAY<ROW<...>>;
  * pandas: a vectorized (pandas/Arrow) scalar UDF returning the 18-column row, process mode (PyFlink runs
    pandas UDFs only there), bundles of 50 ms.

Each variant runs in its own process at --small and at --events records; the cost per record is the
difference of the two divided by the difference of the counts (job start-up cancels out). Wall time and the
CPU of the whole process tree (the JVM and any Python workers) are both reported. Writes
bench/results/pyflink_boundary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import print_table, result_path, write_result
from bench.proc_cpu import TreeCpu

PROG = "python -m bench.pyflink_boundary"
VARIANTS = ("jvm", "per-record", "per-record-lake", "window-only", "batch-bytes", "batch-kv", "batch-rows", "pandas")
WINDOW = "INTERVAL '0.05' SECOND"


def lake_row(value: bytes, i: int) -> tuple:
    """A row shaped like tokenize's lake output: k, v and the 16 LAKE_FIELDS (two of them arrays)."""
    return (value[:10], value, "e1", "u1", "i1", i, "d", 1, 2, 3, 4, 5, [1, 2], [3, 4, 5], "ver", 2, 0, i)


def _process_functions():
    """The Python side of each variant (defined lazily: pyflink is imported only in the child process)."""
    from pyflink.common import Row
    from pyflink.datastream import ProcessFunction

    class PerRecord(ProcessFunction):
        def process_element(self, value, ctx):
            yield Row(value[2][:10], value[2], value[0] * 2)

    class PerRecordLake(ProcessFunction):
        def process_element(self, value, ctx):
            yield Row(*lake_row(value[2], value[0]))

    class BatchBytes(ProcessFunction):
        def process_element(self, value, ctx):
            yield Row([v[:10] for v in value[0]])

    class BatchKeyValues(ProcessFunction):
        def process_element(self, value, ctx):
            yield Row([Row(v[:10], v) for v in value[0]])

    class BatchRows(ProcessFunction):
        def process_element(self, value, ctx):
            yield Row([Row(*lake_row(v, i)) for v, i in zip(value[0], value[1], strict=True)])

    return PerRecord, PerRecordLake, BatchBytes, BatchKeyValues, BatchRows


def build(variant: str, events: int):
    """The variant's job as a statement set over a datagen table of `events` rows."""
    from pyflink.common import Types
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import DataTypes, StreamTableEnvironment
    from pyflink.table.udf import udf

    from jobs.common import REPO_ROOT, flink_python_jar, python_executable, site_packages
    from jobs.lake import LAKE_FIELDS, token_lake_row_type

    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(1)
    t_env = StreamTableEnvironment.create(env)
    conf = t_env.get_config()
    python = python_executable()
    conf.set("pipeline.jars", flink_python_jar().resolve().as_uri())
    conf.set("python.executable", python)
    conf.set("python.client.executable", python)
    conf.set("python.pythonpath", os.pathsep.join([str(REPO_ROOT), *site_packages(python)]))
    conf.set("python.execution-mode", "process" if variant == "pandas" else "thread")
    conf.set("python.fn-execution.bundle.time", "50")
    conf.set("pipeline.object-reuse", "true")
    t_env.execute_sql(
        "CREATE TEMPORARY TABLE src (id BIGINT, p INT, v BYTES, pt AS PROCTIME()) WITH ('connector'='datagen', "
        f"'number-of-rows'='{events}', 'rows-per-second'='1000000000', 'fields.id.kind'='sequence', "
        f"'fields.id.start'='1', 'fields.id.end'='{events}', 'fields.p.min'='0', 'fields.p.max'='0', "
        "'fields.v.length'='60')")
    lake_cols = ", ".join(f"`{n}` {t}" for n, t in LAKE_FIELDS)
    t_env.execute_sql("CREATE TEMPORARY TABLE small_sink (k BYTES, v BYTES, x BIGINT) WITH ('connector'='blackhole')")
    t_env.execute_sql(f"CREATE TEMPORARY TABLE lake_sink (k BYTES, v BYTES, {lake_cols}) "
                      "WITH ('connector'='blackhole')")
    lake_names = ["k", "v", *(n for n, _ in LAKE_FIELDS)]
    unnest_lake = ", ".join(f"u.`{n}`" for n in lake_names)
    batches = ("SELECT ARRAY_AGG(v) AS vs, ARRAY_AGG(id) AS ids FROM TABLE(TUMBLE(TABLE src, DESCRIPTOR(pt), "
               f"{WINDOW})) GROUP BY p, window_start, window_end")
    statements = t_env.create_statement_set()
    per_record, per_record_lake, batch_bytes, batch_kv, batch_rows = _process_functions()
    bytes_type = Types.PRIMITIVE_ARRAY(Types.BYTE())
    small_type = Types.ROW_NAMED(["k", "v", "x"], [bytes_type, bytes_type, Types.LONG()])

    def python_stream(query: str, fn, out_type):
        stream = t_env.to_data_stream(t_env.sql_query(query)).process(fn, output_type=out_type)
        return t_env.from_data_stream(stream)

    if variant == "jvm":
        statements.add_insert_sql("INSERT INTO small_sink SELECT v, v, id * 2 FROM src")
    elif variant == "per-record":
        statements.add_insert("small_sink", python_stream("SELECT id, p, v FROM src", per_record(), small_type))
    elif variant == "per-record-lake":
        statements.add_insert("lake_sink", python_stream("SELECT id, p, v FROM src", per_record_lake(),
                                                         token_lake_row_type()))
    elif variant == "window-only":
        t_env.create_temporary_view("b", t_env.sql_query(batches))
        statements.add_insert_sql("INSERT INTO small_sink SELECT u.v, u.v, 0 FROM b CROSS JOIN UNNEST(b.vs) AS u(v)")
    elif variant == "batch-bytes":
        out = Types.ROW_NAMED(["ks"], [Types.OBJECT_ARRAY(bytes_type)])
        t_env.create_temporary_view("b", python_stream(batches, batch_bytes(), out))
        statements.add_insert_sql("INSERT INTO small_sink SELECT u.k, u.k, 0 FROM b CROSS JOIN UNNEST(b.ks) AS u(k)")
    elif variant == "batch-kv":
        kv_type = Types.ROW_NAMED(["k", "v"], [bytes_type, bytes_type])
        out = Types.ROW_NAMED(["kvs"], [Types.OBJECT_ARRAY(kv_type)])
        t_env.create_temporary_view("b", python_stream(batches, batch_kv(), out))
        statements.add_insert_sql("INSERT INTO small_sink SELECT u.k, u.v, 0 FROM b CROSS JOIN UNNEST(b.kvs) AS u(k, v)")
    elif variant == "batch-rows":
        out = Types.ROW_NAMED(["rows"], [Types.OBJECT_ARRAY(token_lake_row_type())])
        t_env.create_temporary_view("b", python_stream(batches, batch_rows(), out))
        alias = ", ".join(f"`{n}`" for n in lake_names)
        statements.add_insert_sql(f"INSERT INTO lake_sink SELECT {unnest_lake} FROM b "
                                  f"CROSS JOIN UNNEST(b.`rows`) AS u({alias})")
    elif variant == "pandas":
        kinds = {"STRING": DataTypes.STRING(), "BIGINT": DataTypes.BIGINT(), "INT": DataTypes.INT(),
                 "ARRAY<BIGINT>": DataTypes.ARRAY(DataTypes.BIGINT()), "ARRAY<INT>": DataTypes.ARRAY(DataTypes.INT())}
        row_type = DataTypes.ROW([DataTypes.FIELD("k", DataTypes.BYTES()), DataTypes.FIELD("v", DataTypes.BYTES()),
                                  *(DataTypes.FIELD(n, kinds[t]) for n, t in LAKE_FIELDS)])
        t_env.create_temporary_function("lake_rows", udf(pandas_lake_rows, result_type=row_type, func_type="pandas"))
        t_env.create_temporary_view("b", t_env.sql_query("SELECT lake_rows(v, id) AS r FROM src"))
        statements.add_insert_sql(f"INSERT INTO lake_sink SELECT {', '.join(f'r.`{n}`' for n in lake_names)} FROM b")
    else:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    return statements


def pandas_lake_rows(values, ids):
    """The pandas UDF: one 18-column row per input row, as a DataFrame."""
    import pandas as pd

    from jobs.lake import LAKE_FIELDS

    rows = [lake_row(v, i) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
    return pd.DataFrame.from_records(rows, columns=["k", "v", *(n for n, _ in LAKE_FIELDS)])


def child(variant: str, events: int) -> dict[str, Any]:
    """Run one variant to completion in this process; wall time and the process tree's CPU."""
    cpu = TreeCpu()
    start = time.time()
    build(variant, events).execute().wait()
    return {"variant": variant, "events": events, "wall_s": time.time() - start, "cpu_s": cpu.total()}


def run_child(variant: str, events: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.pyflink_boundary", "--child", variant, str(events)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-30:])
        raise SystemExit(f"bench: variant {variant} at {events} events failed (rc {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--events", type=int, default=600_000, help="records of the large run (default: %(default)s)")
    p.add_argument("--small", type=int, default=30_000, help="records of the small run (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs per size and variant; the fastest counts "
                                                         "(default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (default: all)")
    p.add_argument("--name", default="pyflink_boundary", help="result file name (default: %(default)s)")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "EVENTS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.events <= args.small:
        raise SystemExit("--events must be larger than --small (the cost is their difference)")
    from tqdm import tqdm

    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    plan = [(v, n) for _ in range(args.repeat) for n in (args.small, args.events) for v in variants]
    for variant, events in tqdm(plan, desc="variant runs", unit="run"):  # interleaved: drifts hit all alike
        runs.setdefault((variant, events), []).append(run_child(variant, events))
    rows = []
    extra = args.events - args.small
    for v in variants:
        small = min(runs[(v, args.small)], key=lambda r: r["wall_s"])
        large = min(runs[(v, args.events)], key=lambda r: r["wall_s"])
        rows.append({"variant": v, "wall_us_per_record": (large["wall_s"] - small["wall_s"]) / extra * 1e6,
                     "cpu_us_per_record": (large["cpu_s"] - small["cpu_s"]) / extra * 1e6,
                     "startup_wall_s": small["wall_s"]})
    base = {r["variant"]: r for r in rows}
    for r in rows:
        for anchor in ("jvm", "per-record"):
            if anchor in base and base[anchor]["cpu_us_per_record"] > 0:
                r[f"cpu_vs_{anchor.replace('-', '_')}"] = r["cpu_us_per_record"] / base[anchor]["cpu_us_per_record"]
    print_table(rows)
    conditions = {"events": args.events, "small": args.small, "repeat": args.repeat, "window": WINDOW,
                  "anchor": "jvm (the same projection in Flink SQL, no Python)",
                  "load_avg_1m": os.getloadavg()[0]}
    write_result(result_path(args.name), "pyflink_boundary", conditions,
                 {"rows": rows, "runs": [r for rs in runs.values() for r in rs]}, argv, PROG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
