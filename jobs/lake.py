"""The token data lake: parquet files partitioned by event date, written by the tokenize job, read by Feast and the trainer.

Layout (Hive-style partitions, one folder per UTC day of event time)::

    var/lake/events_tokens/dt=2000-12-31/part-<uuid>-<subtask>-<n>.parquet
    var/lake/events_tokens/dt=2000-12-31/_SUCCESS          # partition committed (success-file policy)

Writing: Flink's own filesystem sink (SQL ``'connector'='filesystem'``, ``'format'='parquet'``), fed by the
tokenize operator's main output: with a lake, each token row is (k, v, LAKE_FIELDS...) and SQL splits it into the
Kafka sink's (k, v) and the lake's columns. Not a side output: a PyFlink side output runs the whole chained
sink (conversion, parquet encoding) inside the Python call, holding the interpreter lock that every Python
operator of the TaskManager shares; the main output is handed over after the call returns. Files roll and become visible only when a checkpoint completes, and
a restore discards what the failed attempt had in progress, so each token lands in exactly one committed file
(exactly-once). In-progress files are hidden (``.part-*``), which pyarrow, pandas and Feast skip.

Reading (:func:`read_lake`, :func:`lake_ratings`): pyarrow over the folder, deduplicated by ``event_id`` anyway,
so a second job writing the same events (a replay under a new consumer group) never doubles a rating.

Feast (offline store ``file``, read through dask) cannot read the partitioned folder as Flink writes it: dask's
directory reader wants ``.parquet`` names, and over several files its point-in-time join fails on the timestamp
column (feast 0.67). So Feast's FileSource reads a compacted snapshot, one file with a UTC timestamp::

    python -m jobs.lake snapshot        # var/lake/events_tokens.parquet from var/lake/events_tokens/
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.tokenizer import ACTIONS, TokenizedEvent

if TYPE_CHECKING:
    import pandas as pd

# Columns the Python operator emits; event_ts (TIMESTAMP) and dt are computed by Flink SQL from event_time.
LAKE_FIELDS: tuple[tuple[str, str], ...] = (
    ("event_id", "STRING"),
    ("user_id", "STRING"),
    ("item_id", "STRING"),
    ("event_time", "BIGINT"),
    ("domain", "STRING"),
    ("action_token", "INT"),
    ("rating_token", "INT"),
    ("duration_token", "INT"),
    ("hour_token", "INT"),
    ("weekday_token", "INT"),
    ("context_tokens", "ARRAY<BIGINT>"),
    ("semantic_ids", "ARRAY<INT>"),
    ("sid_version", "STRING"),
    ("tokenizer_version", "INT"),
    ("src_partition", "INT"),
    ("src_offset", "BIGINT"),
)


def default_lake_dir() -> Path:
    from infra.settings import get_settings

    return get_settings().var_dir / "lake" / "events_tokens"


def token_lake_row_type():
    """PyFlink type of the tokenize operator's rows when it feeds a lake: (k, v) then LAKE_FIELDS."""
    from pyflink.common import Types

    kinds = {"STRING": Types.STRING(), "BIGINT": Types.LONG(), "INT": Types.INT(),
             "ARRAY<BIGINT>": Types.BASIC_ARRAY(Types.LONG()), "ARRAY<INT>": Types.BASIC_ARRAY(Types.INT())}
    return Types.ROW_NAMED(["k", "v", *(n for n, _ in LAKE_FIELDS)],
                           [Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE()),
                            *(kinds[t] for _, t in LAKE_FIELDS)])


def lake_values(event: TokenizedEvent, partition: int, offset: int) -> tuple:
    """One token's LAKE_FIELDS values (arrays as lists: PyFlink's BASIC_ARRAY takes lists)."""
    return (event.event_id, event.user_id, event.item_id, event.event_time, event.domain, event.action_token,
            event.rating_token, event.duration_token, event.hour_token, event.weekday_token,
            list(event.context_tokens), list(event.semantic_ids), event.sid_version, event.tokenizer_version,
            int(partition), int(offset))


def lake_sink_ddl(table: str, path: str | Path, rollover: str = "128MB") -> str:
    """The filesystem sink table: LAKE_FIELDS + event_ts, partitioned by dt; files commit on checkpoints."""
    columns = ",\n  ".join(f"`{n}` {t}" for n, t in LAKE_FIELDS)
    return (
        f"CREATE TEMPORARY TABLE `{table}` (\n  {columns},\n  `event_ts` TIMESTAMP(3),\n  `dt` STRING\n"
        ") PARTITIONED BY (`dt`) WITH (\n"
        "  'connector' = 'filesystem',\n"
        f"  'path' = '{Path(path).resolve().as_uri()}',\n"
        "  'format' = 'parquet',\n"
        "  'parquet.compression' = 'SNAPPY',\n"
        f"  'sink.rolling-policy.file-size' = '{rollover}',\n"
        "  'sink.partition-commit.trigger' = 'process-time',\n"
        "  'sink.partition-commit.delay' = '0 s',\n"
        "  'sink.partition-commit.policy.kind' = 'success-file'\n"
        ")"
    )


def lake_insert_sql(table: str, view: str) -> str:
    """event_ts and dt from event_time (epoch ms, UTC: the job sets table.local-time-zone to UTC)."""
    names = ", ".join(f"`{n}`" for n, _ in LAKE_FIELDS)
    return (
        f"INSERT INTO `{table}` SELECT {names}, "
        "CAST(TO_TIMESTAMP_LTZ(`event_time`, 3) AS TIMESTAMP(3)) AS `event_ts`, "
        "DATE_FORMAT(TO_TIMESTAMP_LTZ(`event_time`, 3), 'yyyy-MM-dd') AS `dt` "
        f"FROM `{view}`"
    )


def cluster_has_parquet() -> bool:
    """The cluster's lib/ has the parquet jars (`ugt stack up` links them there, like the Kafka connector)."""
    from jobs.common import cluster_lib_dir

    return any(cluster_lib_dir().glob("flink-parquet-*.jar"))


def add_lake_jars(env, t_env) -> None:
    """Put the parquet jars on the job's classpath (client planning and the cluster's user class loader)."""
    from infra.jars import parquet_jars

    # env.add_jars appends to pipeline.jars (the job's jars, which the table environment shares) and puts them
    # on the client's context class loader, where the planner looks up the parquet format factory
    env.add_jars(*[jar.resolve().as_uri() for jar in parquet_jars()])


def add_lake_sink(env, t_env, statements, view: str, path: str | Path, table: str = "lake_sink",
                  ship_jars: bool = True) -> None:
    """Write the LAKE_FIELDS columns of the temporary view `view` to parquet under `path` (statement set).

    ship_jars=False when the cluster's lib/ has the parquet jars: loaded once per TaskManager, their classes stay
    JIT-compiled across jobs instead of being loaded and compiled again by each job's class loader."""
    if ship_jars:
        add_lake_jars(env, t_env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    t_env.execute_sql(lake_sink_ddl(table, path))
    statements.add_insert_sql(lake_insert_sql(table, view))


def read_lake(path: str | Path | None = None, start: str | None = None, end: str | None = None) -> pd.DataFrame:
    """Every committed token in the lake (dt between start and end, inclusive, as YYYY-MM-DD), one row per event_id.

    Ordered by event time, then by where the event came from (partition, offset), so reading twice gives the
    same order. Raises FileNotFoundError with what to run when the lake is empty.
    """
    import pyarrow.dataset as ds

    folder = Path(path) if path else default_lake_dir()
    files = [p for p in folder.glob("dt=*/*") if p.is_file() and not p.name.startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"no committed parquet files under {folder}: run the tokenize job with --lake "
                                f"{folder} (files commit on checkpoints)")
    dataset = ds.dataset(str(folder), format="parquet", partitioning="hive",
                         exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    filters = None
    if start:
        filters = ds.field("dt") >= start
    if end:
        filters = (ds.field("dt") <= end) if filters is None else filters & (ds.field("dt") <= end)
    frame = dataset.to_table(filter=filters).to_pandas()
    frame["dt"] = frame["dt"].astype(str)
    frame = frame.sort_values(["event_time", "src_partition", "src_offset", "event_id"], kind="stable")
    return frame.drop_duplicates("event_id", keep="first").reset_index(drop=True)


def lake_ratings(path: str | Path | None = None, **window: Any) -> pd.DataFrame:
    """The lake as the trainer's ratings frame (contracts.datasets' generic format).

    user_id, item_id (str), timestamp (epoch s), rating (stars back from the half-star rating token; NaN when
    none), row (order in the lake), action (VIEW/CLICK/RATE/...).
    """
    import numpy as np
    import pandas as pd

    tokens = read_lake(path, **window)
    ratings = pd.DataFrame({
        "user_id": tokens["user_id"].astype(str),
        "item_id": tokens["item_id"].astype(str),
        "timestamp": (tokens["event_time"] // 1000).astype("int64"),
        "rating": np.where(tokens["rating_token"] > 0, tokens["rating_token"] / 2.0, np.nan),
        "row": np.arange(len(tokens), dtype="int64"),
        "action": [ACTIONS[t] if 0 <= t < len(ACTIONS) else "UNKNOWN" for t in tokens["action_token"]],
    })
    return ratings


def lake_dataset(path: str | Path | None = None, **window: Any):
    """A contracts.datasets.Dataset over the lake's ratings (no item metadata: the lake holds events only)."""
    import pandas as pd

    from contracts.datasets import Dataset

    ratings = lake_ratings(path, **window)
    ids = pd.unique(ratings["item_id"])
    items = pd.DataFrame({"item_id": ids, "title": "", "year": pd.array([pd.NA] * len(ids), dtype="Int64"),
                          "genres": [[] for _ in ids]})
    return Dataset(name=f"lake:{Path(path) if path else default_lake_dir()}", ratings=ratings, items=items)


def lake_sequences(path: str | Path | None, tie_order: str = "hstu", max_users: int = 0):
    """The trainer's SequenceData built from the lake (models.data.build_sequences), for `ugt train --lake`."""
    from models.data import build_sequences

    data = build_sequences(lake_dataset(path), tie_order)
    if max_users > 0:
        data.user_ids = data.user_ids[:max_users]
        data.items, data.times, data.ratings = data.items[:max_users], data.times[:max_users], data.ratings[:max_users]
    return data


def snapshot_path(lake: str | Path | None = None) -> Path:
    """Where the compacted snapshot of a lake folder goes: <lake>.parquet beside it."""
    folder = Path(lake) if lake else default_lake_dir()
    return folder.with_name(folder.name + ".parquet")


def write_snapshot(lake: str | Path | None = None, out: str | Path | None = None) -> tuple[Path, int]:
    """Compact the lake into one parquet file for Feast (deduplicated, event_ts as UTC); returns (path, rows).

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = read_lake(lake)
    table = pa.Table.from_pandas(frame.drop(columns=["dt"]), preserve_index=False)
    index = table.schema.get_field_index("event_ts")
    table = table.set_column(index, "event_ts", table["event_ts"].cast(pa.timestamp("ms", tz="UTC")))
    target = Path(out) if out else snapshot_path(lake)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(target)
    return target, table.num_rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jobs.lake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="compact the lake into one parquet file for Feast's FileSource")
    snap.add_argument("--lake", default=str(default_lake_dir()), help="lake folder (default: %(default)s)")
    snap.add_argument("--out", help="output file (default: <lake>.parquet)")
    sub.add_parser("show", help="rows, users, items and partitions of the lake").add_argument(
        "--lake", default=str(default_lake_dir()), help="lake folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "snapshot":
            path, rows = write_snapshot(args.lake, args.out)
            print(f"wrote {rows} events to {path}")
        else:
            frame = read_lake(args.lake)
            print(f"{len(frame)} events, {frame['user_id'].nunique()} users, {frame['item_id'].nunique()} items, "
                  f"{frame['dt'].nunique()} partitions ({frame['dt'].min()} .. {frame['dt'].max()})")
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
