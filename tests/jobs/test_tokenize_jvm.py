"""The tokenize job's JVM engine (jobs/jvm/, `--engine sql`) against the Python tokenizer, record by record.

`ugt.flink.TokenizeCheck` runs the same RecordTokenizer the Flink table function runs (no Flink, the same
in-process Schema Registry as the Python side); every token must come out byte for byte as EventTokenizer
writes it, every dead letter with the same key, reason code, original bytes and origin. Needs a JDK (javac)
and the Avro jars (resolved from Maven Central once, like the stack's other jars).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from job_events import make_event, user_event_variant

from contracts.limits import MAX_ID_CHARS
from contracts.tokenizer import stable_hash64
from jobs.tokenize_logic import EventTokenizer, Rules
from jobs.tokenize_sql import jvm_options, register_output_schemas
from streams.serde import AvroSerde, decode_body, encode_with_id, load_schema

pytestmark = pytest.mark.skipif(shutil.which("javac") is None or shutil.which("java") is None,
                                reason="needs a JDK (javac) to compile jobs/jvm/")

RAW, TOKENS, DLQ = "tj.raw", "tj.tokens", "tj.dlq"
NOW_MS = 1_700_000_000_000
RULES = Rules(max_record_bytes=4096)


def variant_record(serde: AvroSerde, subject: str, schema_json: str, record: dict[str, Any]) -> bytes:
    import fastavro

    schema_id = serde.registry.register(subject, schema_json)
    return encode_with_id(schema_id, fastavro.parse_schema(json.loads(schema_json)), record)


def zigzag(n: int) -> bytes:
    """An Avro long (zig-zag varint)."""
    n, out = (n << 1) ^ (n >> 63), bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes([*out, n])


def corpus(serde: AvroSerde) -> dict[str, bytes | None]:
    """name -> record: valid events over the tokenizer's edges, then every malformed kind the JVM handles."""
    subject = f"{RAW}-value"

    def event(i: int, **over: Any) -> bytes:
        return serde.encode(subject, "user_event", make_event(i, **over))

    valid = event(1)
    records: dict[str, bytes | None] = {f"action-{a}": event(i, action=a) for i, a in enumerate(
        ("VIEW", "CLICK", "RATE", "LIKE", "PURCHASE", "SKIP", "SHARE", "UNKNOWN"))}
    for i, rating in enumerate((None, 0.0, 0.2, 0.5, 0.7, 2.5, 3.3, 5.0, 7.5, 1e30, -4.0)):
        records[f"rating-{rating}"] = event(20 + i, rating=rating)
    for i, duration in enumerate((None, -1.0, 0.0, 0.4, 1.0, 3.0, 7.0, 1023.5, 1e6, 3e38)):
        records[f"duration-{duration}"] = event(40 + i, duration_s=duration)
    contexts = ({}, {"device": "ios", "page": "home", "a": "1"}, {"ключ": "значение", "é": "ü", "😀": "x"},
                {"long": "v" * 300}, {"k" * 127: ""}, {"z": "", "": "empty key"},
                *({"item_length_s": length, "a": "b"} for length in (  # contracts.tokenizer.item_length's float()
                    "120", " 1_000.5\n", "-3", "0", "abc", "1e400", "3.5e38", "٣٠", "nan", "inf", "1__0", "2.", ".5",
                    "1e1_0", "0x10", "1d", "")))
    for i, context in enumerate(contexts):
        records[f"context-{i}"] = event(60 + i, context=context)
    for i, t in enumerate((631_152_000_000, 978_307_200_000, 1_600_000_000_123, NOW_MS + 86_400_000)):
        records[f"time-{t}"] = event(70 + i, t_ms=t)
    for i, domain in enumerate(("", "video", "a.b-c_d", "x" * 64)):
        records[f"domain-{i}"] = event(80 + i, domain=domain)
    records["ids-at-bound"] = event(90, user="u" * MAX_ID_CHARS, item_id="é" * MAX_ID_CHARS)
    records.update({
        "BAD_MAGIC-empty": b"", "BAD_MAGIC-short": b"\x00\x00", "BAD_MAGIC-text": b"not avro at all",
        "BAD_MAGIC-byte": b"\x01" + valid[1:], "BAD_MAGIC-null": None,
        "UNKNOWN_SCHEMA": struct.pack(">bI", 0, 987_654) + valid[5:],
        "DECODE_ERROR-truncated": valid[:-6], "DECODE_ERROR-trailing": valid + b"\x02\x04",
        # lengths the record cannot hold: a 2 GB event_id, a map of 2^30 pairs (never allocated: -Xmx256m below)
        "DECODE_ERROR-huge-string": valid[:5] + zigzag(2_000_000_000) + b"abc",
        "DECODE_ERROR-huge-map": event(1, context={})[:-1] + zigzag(1 << 30) + b"\x02a",
        "OVERSIZED": b"\x00" * (RULES.max_record_bytes + 1),
        "MISSING_FIELD": variant_record(serde, "tj-missing-value", user_event_variant(drop="item_id"),
                                        {k: v for k, v in make_event(1).items() if k != "item_id"}),
        "WRONG_TYPE-time": variant_record(serde, "tj-string-value", user_event_variant(retype={"event_time": "string"}),
                                          make_event(1, event_time="2001-01-01T00:00:00Z")),
        "WRONG_TYPE-rating": variant_record(serde, "tj-rating-value", user_event_variant(retype={"rating": ["null", "string"]}),
                                            make_event(1, rating="five")),
        "BAD_VALUE-empty-user": event(1, user=""), "BAD_VALUE-empty-event": event(1, event_id=""),
        "BAD_VALUE-long-item": event(1, item_id="i" * (MAX_ID_CHARS + 1)),
        "BAD_VALUE-nan": event(1, rating=math.nan), "BAD_VALUE-inf": event(1, duration_s=-math.inf),
        "BAD_VALUE-domain": event(1, domain="bad domain!"), "BAD_VALUE-domain-long": event(1, domain="x" * 65),
        "FAR_FUTURE": event(1, t_ms=NOW_MS + 2 * 86_400_000),
        "TOO_OLD": event(1, t_ms=315_532_800_000),
    })
    return records


def run_jvm(tmp_path: Path, options: str, records: list[tuple[bytes | None, str, int, int]]) -> list[dict]:
    done = run_check(tmp_path, options, records)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def run_check(tmp_path: Path, options: str,
              records: list[tuple[bytes | None, str, int, int]]) -> subprocess.CompletedProcess[str]:
    """`ugt.flink.TokenizeCheck` over the records, as a finished process (its exit status unchecked)."""
    import pyflink

    from infra.jars import tokenize_jvm_jars

    # Flink's lib/ gives slf4j and log4j, as on the TaskManager
    jars = [*tokenize_jvm_jars(), *sorted((Path(pyflink.__file__).parent / "lib").glob("*.jar"))]
    request = tmp_path / "in.json"
    request.write_text(json.dumps({"config": options, "now_ms": NOW_MS, "records": [
        [None if data is None else data.hex(), topic, partition, offset] for data, topic, partition, offset in records]}))
    return subprocess.run(["java", "-Xmx256m", "-cp", ":".join(map(str, jars)), "ugt.flink.TokenizeCheck",
                           str(request)], capture_output=True, text=True, timeout=120)


def test_jvm_tokens_and_dead_letters_equal_the_python_tokenizer(serde: AvroSerde, registry_url: str,
                                                                 tmp_path: Path) -> None:
    records = corpus(serde)
    tokens_id, dlq_id = register_output_schemas(registry_url, TOKENS, DLQ)
    python = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_MS / 1000, rules=RULES)
    assert (python.tokens_schema_id, python.dlq_schema_id) == (tokens_id, dlq_id)
    inputs = [(data, RAW, i % 3, 1000 + i) for i, data in enumerate(records.values())]
    jvm = run_jvm(tmp_path, jvm_options(registry_url, tokens_id, dlq_id, vars(RULES)), inputs)
    assert len(jvm) == len(inputs)
    tokens = 0
    for name, (data, topic, partition, offset), got in zip(records, inputs, jvm, strict=True):
        want = python.process(data, topic, partition, offset)
        assert (got["dead"], bytes.fromhex(got["k"])) == (want.dead, want.key), (name, got)
        if want.dead is None:
            tokens += 1
            assert bytes.fromhex(got["v"]) == want.value, name
            continue
        expected_code = name.split("-")[0]
        assert want.dead == expected_code, (name, want.dead)
        letter = decode_body(load_schema("dead_letter"), bytes.fromhex(got["v"])[5:])
        reference = decode_body(load_schema("dead_letter"), want.value[5:])
        assert letter.pop("reason") and reference.pop("reason")
        assert letter == reference, name
        assert letter["original"] == (data or b"")
        assert bytes.fromhex(got["v"])[:5] == want.value[:5]
    assert tokens == sum(1 for n in records if n.split("-")[0] not in {
        "BAD_MAGIC", "UNKNOWN_SCHEMA", "DECODE_ERROR", "OVERSIZED", "MISSING_FIELD", "WRONG_TYPE", "BAD_VALUE",
        "FAR_FUTURE", "TOO_OLD"})


def test_context_hash_is_blake2b_as_python_computes_it(serde: AvroSerde, registry_url: str, tmp_path: Path) -> None:
    """Multi-block inputs (over 128 bytes) and non-ASCII keys hash as contracts.tokenizer.stable_hash64 does."""
    context = {"k" * 200: "v" * 57, "ü": "😀"}
    tokens_id, dlq_id = register_output_schemas(registry_url, TOKENS, DLQ)
    data = serde.encode(f"{RAW}-value", "user_event", make_event(5, context=context))
    got = run_jvm(tmp_path, jvm_options(registry_url, tokens_id, dlq_id, vars(RULES)), [(data, RAW, 0, 1)])[0]
    token = decode_body(load_schema("tokenized_event"), bytes.fromhex(got["v"])[5:])
    assert token["context_tokens"] == [stable_hash64(f"{k}={context[k]}") for k in sorted(context)]


@pytest.mark.slow
def test_table_function_in_flink_sql_on_minicluster(serde: AvroSerde, registry_url: str) -> None:
    """`ugt_tokenize` as the job runs it (Flink SQL, LATERAL TABLE, one row per record), on in-process Flink."""
    from pyflink.common import Row
    from pyflink.table import DataTypes

    from jobs.common import JobConfig, connector_jar, create_env, python_executable
    from jobs.tokenize_sql import add_tokenize_function, tokenized_query

    records = [serde.encode(f"{RAW}-value", "user_event", make_event(i, user=f"u{i % 3}")) for i in range(12)]
    records += [b"junk", struct.pack(">bI", 0, 55_555) + b"\x02", records[0][:-4]]
    cfg = JobConfig(job_name="tokenize", bootstrap="unused:9092", registry=registry_url, redis="", group_id="t",
                    parallelism=2, local=True, checkpoint_interval_ms=0, connector_jar=str(connector_jar()),
                    python=python_executable())
    env, t_env = create_env(cfg)
    add_tokenize_function(env, t_env)
    t_env.create_temporary_view("raw", t_env.from_elements(
        [Row(bytearray(data), RAW, i % 2, i) for i, data in enumerate(records)],
        DataTypes.ROW([DataTypes.FIELD("value", DataTypes.BYTES()), DataTypes.FIELD("src_topic", DataTypes.STRING()),
                       DataTypes.FIELD("src_partition", DataTypes.INT()),
                       DataTypes.FIELD("src_offset", DataTypes.BIGINT())])))
    tokens_id, dlq_id = register_output_schemas(registry_url, TOKENS, DLQ)
    options = jvm_options(registry_url, tokens_id, dlq_id, vars(RULES))
    table = t_env.sql_query(f"SELECT `src_offset`, `k`, `v`, `dead`, `context_tokens` FROM ({tokenized_query('raw', options)})")
    with table.execute().collect() as results:
        rows = {row[0]: row for row in results}
    python = EventTokenizer(serde, TOKENS, DLQ, rules=RULES)
    assert sorted(rows) == list(range(len(records)))
    for offset, data in enumerate(records):
        want = python.process(data, RAW, offset % 2, offset)
        _, key, value, dead, context = rows[offset]
        assert (dead, bytes(key)) == (want.dead, want.key)
        if dead is None:  # a token carries no clock: byte-equal (a dead letter's failed_at is the wall clock)
            assert bytes(value) == want.value and list(context) == list(want.event.context_tokens)
    assert [rows[o][3] for o in (12, 13, 14)] == ["BAD_MAGIC", "UNKNOWN_SCHEMA", "DECODE_ERROR"]


def test_engine_option_and_what_the_sql_engine_refuses() -> None:
    import argparse

    from jobs import tokenize_job
    from jobs.common import JobSetupError

    parser = argparse.ArgumentParser()
    tokenize_job.add_arguments(parser)
    assert tokenize_job.job_options(parser.parse_args([]))["engine"] == "sql"  # the JVM engine is the default
    assert tokenize_job.job_options(parser.parse_args(["--engine", "sql", "--no-semantic-ids"]))["engine"] == "sql"
    assert tokenize_job.job_options(parser.parse_args(["--engine", "sql", "--redis", "redis://h:1/0"]))["engine"] == "sql"
    with pytest.raises(JobSetupError, match="redis:// or redis"):  # the JVM side is set up for plain TCP only
        tokenize_job.job_options(parser.parse_args(["--engine", "sql", "--redis", "rediss://h:1/0"]))


def test_jvm_options_refuse_what_would_break_the_sql_literal() -> None:
    rules = vars(RULES)
    assert jvm_options("http://r:1/apis", 3, 4, rules).split(";")[0] == "registry=http://r:1/apis"
    with pytest.raises(ValueError, match="quote"):
        jvm_options("http://r:1/it's", 3, 4, rules)
    with pytest.raises(ValueError, match="quote"):
        jvm_options("http://r:1/a;b", 3, 4, rules)


@pytest.fixture()
def redis_url(tmp_path: Path):
    """A redis-server of this test's own on a free port of 16379-16399 (db 2, to exercise SELECT)."""
    import socket
    import time

    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    for port in range(16379, 16400):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
    else:
        pytest.skip("no free port in 16379-16399")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/2"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(10)


@pytest.mark.parametrize("pinned", [False, True])
def test_semantic_ids_and_unknown_items_equal_the_python_tokenizer(serde: AvroSerde, registry_url: str,
                                                                    redis_url: str, tmp_path: Path,
                                                                    pinned: bool) -> None:
    """The JVM's semantic-ID cache (HSCAN at load, HMGET for misses) and UNKNOWN_ITEM, against SemanticIdCache."""
    import redis

    from contracts.redis_keys import ACTIVE_KEY, item_key
    from jobs.sid_cache import SemanticIdCache

    client = redis.Redis.from_url(redis_url)
    version = "v-jvm"
    client.hset(item_key(version), mapping={f"item{i}": f"{i % 3}-{i}-0" for i in range(6)})  # item6 has none
    client.hset(item_key("other"), mapping={"item0": "9-9-9"})
    client.set(ACTIVE_KEY, "other" if pinned else version)
    rules = Rules(max_record_bytes=4096, unknown_items="dlq")
    tokens_id, dlq_id = register_output_schemas(registry_url, TOKENS, DLQ)
    records = [serde.encode(f"{RAW}-value", "user_event", make_event(i, context={})) for i in range(14)]
    records += [b"junk", serde.encode(f"{RAW}-value", "user_event", make_event(99, user=""))]
    python = EventTokenizer(serde, TOKENS, DLQ, clock=lambda: NOW_MS / 1000, rules=rules,
                            sids=SemanticIdCache(client, version=version if pinned else None))
    options = jvm_options(registry_url, tokens_id, dlq_id, vars(rules), redis_url, version if pinned else "")
    jvm = run_jvm(tmp_path, options, [(data, RAW, 0, i) for i, data in enumerate(records)])
    dead = []
    for offset, (data, got) in enumerate(zip(records, jvm, strict=True)):
        want = python.process(data, RAW, 0, offset)
        reason = decode_body(load_schema("dead_letter"), bytes.fromhex(got["v"])[5:])["reason"] if got["dead"] else ""
        assert (got["dead"], bytes.fromhex(got["k"])) == (want.dead, want.key), (offset, reason)
        if want.dead is None:
            assert bytes.fromhex(got["v"]) == want.value, offset
            assert want.event.sid_version == version and want.event.semantic_ids
        dead.append(want.dead)
    assert dead.count("UNKNOWN_ITEM") == 2 and "BAD_MAGIC" in dead and "BAD_VALUE" in dead


def test_a_redis_error_mid_run_fails_instead_of_dead_lettering(serde: AvroSerde, registry_url: str, redis_url: str,
                                                                tmp_path: Path) -> None:
    """A user whose ACL allows the version's load (GET, HSCAN) but not HMGET: the first unknown item's lookup
    fails, and that ends the run (the task, in Flink) instead of dead-lettering the record as PROCESSING_ERROR."""
    import redis

    from contracts.redis_keys import ACTIVE_KEY, item_key

    client = redis.Redis.from_url(redis_url)
    client.hset(item_key("v-acl"), mapping={"item0": "1-2-0"})
    client.set(ACTIVE_KEY, "v-acl")
    client.acl_setuser("tok", enabled=True, passwords=["+s3cr%t"], keys=["*"],
                       commands=["+@connection", "+select", "+get", "+hscan"])
    url = redis_url.replace("redis://", "redis://tok:s3cr%25t@")  # user and a %-escaped password, as redis-py reads
    tokens_id, dlq_id = register_output_schemas(registry_url, TOKENS, DLQ)
    records = [serde.encode(f"{RAW}-value", "user_event", make_event(i, context={})) for i in range(2)]
    done = run_check(tmp_path, jvm_options(registry_url, tokens_id, dlq_id, vars(RULES), url),
                     [(data, RAW, 0, i) for i, data in enumerate(records)])
    assert done.returncode != 0 and done.stdout == ""
    assert "semantic IDs: Redis HMGET failed" in done.stderr and "NOPERM" in done.stderr, done.stderr[-3000:]
