"""The tokenize operator in a real PyFlink pipeline on the in-process mini-cluster (from_collection)."""

from __future__ import annotations

import struct

import pytest
from job_events import make_event

from contracts.tokenizer import TokenizedEvent, tokenize_event
from jobs.common import JobConfig, connector_jar, create_env, python_executable, source_row_type
from streams.serde import AvroSerde

RAW, TOKENS, DLQ = "p.raw", "p.tokens", "p.dlq"


def local_config(mode: str) -> JobConfig:
    return JobConfig(job_name="tokenize", bootstrap="unused:9092", registry="", redis="", group_id="test",
                     parallelism=2, local=True, checkpoint_interval_ms=0, execution_mode=mode,
                     connector_jar=str(connector_jar()), python=python_executable())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_tokenize_operator_on_minicluster(mode: str, serde: AvroSerde, registry_url: str):
    from pyflink.common import Row, Types

    from jobs.common import key_value_type
    from jobs.operators.tokenize_fn import DLQ_TAG, TokenizeFunction

    good = [make_event(i, user=f"u{i % 3}") for i in range(20)]
    rows = [Row(serde.encode(f"{RAW}-value", "user_event", e), RAW, 0, i) for i, e in enumerate(good)]
    bad = {100: b"junk", 101: struct.pack(">bI", 0, 55_555) + b"\x02", 102: rows[0][0][:-4]}
    rows += [Row(data, RAW, 1, offset) for offset, data in bad.items()]

    env, _ = create_env(local_config(mode))
    stream = env.from_collection(rows, type_info=source_row_type())
    tokens = stream.process(TokenizeFunction(registry_url, TOKENS, DLQ), output_type=key_value_type())
    tagged_type = Types.ROW([Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE())])
    both = tokens.map(lambda r: Row("token", r[0], r[1]), output_type=tagged_type).union(
        tokens.get_side_output(DLQ_TAG).map(lambda r: Row("dlq", r[0], r[1]), output_type=tagged_type))
    with both.execute_and_collect() as results:
        out = [(kind, as_bytes(k), as_bytes(v)) for kind, k, v in results]

    got_tokens = sorted((TokenizedEvent.from_record(serde.decode(v).record) for kind, _, v in out if kind == "token"),
                        key=lambda t: t.event_id)
    assert got_tokens == sorted((tokenize_event(e) for e in good), key=lambda t: t.event_id)
    letters = {serde.decode(v).record["offset"]: serde.decode(v).record for kind, _, v in out if kind == "dlq"}
    assert {o: r["reason_code"] for o, r in letters.items()} == {
        100: "BAD_MAGIC", 101: "UNKNOWN_SCHEMA", 102: "DECODE_ERROR"}
    assert all(letters[o]["original"] == data for o, data in bad.items())


def as_bytes(value) -> bytes:
    """Collected byte[] come back as bytes, or as a list of signed ints from the JVM."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return bytes(b & 0xFF for b in value)
