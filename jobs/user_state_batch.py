"""user_state's micro-batches: a key's records grouped in the JVM, handed to Python once per (key, batch) as bytes.

One Python call per record cost user_state ~46 µs of TaskManager CPU per event in thread mode (docs/JOBS.md), most
of it the crossing, not the fold (bench/results/user_state_cost.json: 8 µs). `ugt.flink.KeyBatchOperator`
(jobs/jvm/), chained to the Kafka source, buffers the records per key and emits one Row(key, Row(records, k,
src_topic)) per key when the oldest buffered record has waited ``--batch-ms``, when ``--batch-records`` are
buffered, before every checkpoint barrier and at the end of input. It keeps no state: a checkpoint never covers a
buffered record, so exactly-once and the bundle-end flush (jobs/operators/bundle_flush.py) hold as before.
The cost is latency: a record waits up to ``--batch-ms`` before user_state sees it.

`records` packs, per record in arrival order (big-endian): int32 value length (-1 = null), the value, int32
partition, int64 offset (ugt.flink.KeyBatches); :func:`iter_records` / :func:`unpack_records` read it,
:func:`pack_records` writes it (tests hold the Java packer to it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

_SIZE = struct.Struct(">i")
_ORIGIN = struct.Struct(">iq")



def pack_records(records: Iterable[tuple[bytes | None, int, int]]) -> bytes:
    """(value, partition, offset) records -> one batch's bytes, as ugt.flink.KeyBatches writes them."""
    out = bytearray()
    for value, partition, offset in records:
        out += _SIZE.pack(-1 if value is None else len(value))
        if value is not None:
            out += value
        out += _ORIGIN.pack(partition, offset)
    return bytes(out)


def iter_records(data: bytes) -> Iterator[tuple[bytes | None, int, int]]:
    """One batch's bytes -> (value, partition, offset) per record in arrival order; ValueError if cut short."""
    pos, end = 0, len(data)
    try:
        while pos < end:
            (size,) = _SIZE.unpack_from(data, pos)
            pos += 4
            value = None
            if size >= 0:
                if pos + size > end:
                    raise ValueError(f"a record of {size} bytes at {pos} overruns the batch of {end} bytes")
                value = data[pos:pos + size]
                pos += size
            partition, offset = _ORIGIN.unpack_from(data, pos)
            pos += 12
            yield value, partition, offset
    except struct.error as exc:
        raise ValueError(f"batch cut short at byte {pos} of {end}: {exc}") from exc


def unpack_records(data: bytes) -> list[tuple[bytes | None, int, int]]:
    """One batch's bytes -> [(value, partition, offset), ...] in arrival order; ValueError if they are cut short."""
    return list(iter_records(data))


def batch_jars() -> list:
    """jobs/jvm/ compiled (+ its dependencies), which holds ugt.flink.KeyBatchOperator; JobSetupError without a JDK."""
    from infra.jars import tokenize_jvm_jars
    from infra.stack_errors import StackError
    from jobs.common import JobSetupError

    try:
        return tokenize_jvm_jars()
    except StackError as exc:
        raise JobSetupError(f"user_state's micro-batches run ugt.flink.KeyBatchOperator from jobs/jvm/: {exc}\n"
                            "(or run one Python call per record: --batch-ms 0)") from exc


def batched_kafka_source(env, t_env, table: str, topic: str, cfg, max_delay_ms: int, max_records: int):
    """A KeyedStream of Row(records, k, src_topic) batches, keyed by the record key as text ('' when unkeyed), like
    jobs.common.keyed_kafka_source but one row per (key, batch): SQL reads the topic, ugt.flink.KeyBatchOperator
    (chained to the source) batches, flink-python's KeyByKeySelector keys the batches."""
    from pyflink.common import Types
    from pyflink.datastream.data_stream import DataStream, KeyedStream
    from pyflink.java_gateway import get_gateway

    from jobs.common import kafka_source_ddl

    env.add_jars(*[jar.resolve().as_uri() for jar in batch_jars()])
    t_env.execute_sql(kafka_source_ddl(table, topic, cfg, with_key=True))
    rows = t_env.sql_query(
        "SELECT COALESCE(CAST(`k` AS STRING), '') AS `key`, `value`, `k`, `src_topic`, `src_partition`, "
        f"`src_offset` FROM `{table}`")
    batch_type = Types.ROW_NAMED(["records", "k", "src_topic"],
                                 [Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE()),
                                  Types.STRING()])
    gateway = get_gateway()
    operator = gateway.jvm.ugt.flink.KeyBatchOperator(max_delay_ms, max_records)
    j_stream = t_env._j_tenv.toDataStream(rows._j_table).transform(
        "key-batches", Types.ROW([Types.STRING(), batch_type]).get_java_type_info(), operator)
    j_stream.uid("key-batches")
    selector = gateway.jvm.org.apache.flink.streaming.api.functions.python.KeyByKeySelector()
    j_keyed = j_stream.keyBy(selector, Types.ROW([Types.STRING()]).get_java_type_info())
    return KeyedStream(j_keyed, batch_type, DataStream(j_stream))
