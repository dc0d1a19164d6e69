"""user_state's micro-batches (jobs/user_state_batch.py, ugt.flink.KeyBatches): the batch format both sides
agree on, the JVM's grouping (per key, in arrival order, split where the record key bytes change), and the
operator's log buffer, which writes a batch's log entries to Flink state in one call."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from jobs.user_state_batch import pack_records, unpack_records

RECORDS = [(b"\x00\x00\x00\x00\x01abc", 0, 0), (None, 3, 2**40 + 7), (b"", 2**31 - 1, 2**63 - 1), (b"x" * 300, 1, 5)]


def test_records_round_trip_through_the_batch_format() -> None:
    data = pack_records(RECORDS)
    assert unpack_records(data) == RECORDS
    assert data[:4] == b"\x00\x00\x00\x08" and data[24:28] == b"\xff\xff\xff\xff"  # length, then -1 = null
    assert unpack_records(b"") == []


@pytest.mark.parametrize("cut", [1, 5, 15, 19])
def test_a_batch_cut_short_is_an_error_not_fewer_records(cut: int) -> None:
    data = pack_records(RECORDS[:2])
    with pytest.raises(ValueError, match="cut short|overruns"):
        unpack_records(data[:-cut])


def run_key_batches(lines: list[str]) -> list[tuple[str, bytes | None, str, int, bytes]]:
    """ugt.flink.KeyBatchCheck over the lines: (key, record key, topic, count, records) per batch it emits."""
    import pyflink

    from infra.jars import tokenize_jvm_jars

    jars = [*tokenize_jvm_jars(), *sorted((Path(pyflink.__file__).parent / "lib").glob("*.jar"))]
    done = subprocess.run(["java", "-Xmx128m", "-cp", ":".join(map(str, jars)), "ugt.flink.KeyBatchCheck"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    batches = []
    for line in done.stdout.splitlines():
        key, k, topic, count, records = line.split("\t")
        batches.append((key, None if k == "-" else bytes.fromhex(k), topic, int(count), bytes.fromhex(records)))
    return batches


def line(key: str, k: bytes | None, value: bytes | None, partition: int, offset: int, topic: str = "t") -> str:
    return "\t".join([key, "-" if k is None else k.hex(), topic, "-" if value is None else value.hex(),
                      str(partition), str(offset)])


@pytest.mark.skipif(shutil.which("javac") is None or shutil.which("java") is None, reason="needs a JDK")
def test_jvm_batches_group_per_key_in_arrival_order_in_the_python_format() -> None:
    lines = [line("u1", b"u1", b"a1", 0, 10), line("u2", b"u2", b"b1", 1, 20), line("u1", b"u1", None, 0, 11),
             line("", None, b"n1", 2, 30), line("u2", b"u2", b"", 1, 21), line("u1", b"u1", b"a3", 0, 12),
             "DRAIN", line("u1", b"u1", b"a4", 0, 13),
             line("u1", b"\xffu1", b"x1", 0, 14),  # other key bytes under the same key text: closes u1's batch
             line("", b"", b"e1", 2, 31)]  # empty key bytes vs. no key: two batches of the key text ''
    batches = run_key_batches(lines)
    assert batches == [
        ("u1", b"u1", "t", 3, pack_records([(b"a1", 0, 10), (None, 0, 11), (b"a3", 0, 12)])),
        ("u2", b"u2", "t", 2, pack_records([(b"b1", 1, 20), (b"", 1, 21)])),
        ("", None, "t", 1, pack_records([(b"n1", 2, 30)])),
        ("u1", b"u1", "t", 1, pack_records([(b"a4", 0, 13)])),  # closed by the next record, not by the drain
        ("u1", b"\xffu1", "t", 1, pack_records([(b"x1", 0, 14)])),
        ("", b"", "t", 1, pack_records([(b"e1", 2, 31)])),
    ]
    assert [unpack_records(b[4]) for b in batches][0] == [(b"a1", 0, 10), (None, 0, 11), (b"a3", 0, 12)]


class FakeListState:
    """The calls _FlinkStore makes on a PyFlink ListState, counted."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.calls = 0

    def get(self):
        self.calls += 1
        return list(self.items) or None

    def add_all(self, values: list[bytes]) -> None:
        self.calls += 1
        self.items.extend(values)

    def clear(self) -> None:
        self.calls += 1
        self.items = []


def test_log_entries_of_a_batch_reach_flink_state_in_one_call() -> None:
    from jobs.operators.user_state_fn import _FlinkStore

    log = FakeListState()
    store = _FlinkStore(None, None, log)
    for entry in (b"e1", b"e2", b"e3"):
        store.log_add(entry)
    assert log.calls == 0 and store.log_get() == [b"e1", b"e2", b"e3"]  # read back before the batch ends
    store.end_key()
    assert log.items == [b"e1", b"e2", b"e3"] and log.calls == 2
    store.log_add(b"e4")
    store.log_clear()  # a snapshot mid-batch drops what was added before it
    store.log_add(b"e5")
    store.end_key()
    assert log.items == [b"e5"] and store.log_get() == [b"e5"]
    store.end_key()  # nothing added: no call
    assert log.calls == 5  # get, add_all, clear, add_all, get


def test_without_a_jdk_the_batched_job_fails_at_start_saying_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.jars
    from infra.stack_errors import StackError
    from jobs.common import JobSetupError
    from jobs.user_state_batch import batch_jars

    def no_jdk(*_args, **_kwargs):
        raise StackError("javac/jar not found")

    monkeypatch.setattr(infra.jars, "tokenize_jvm_jars", no_jdk)
    with pytest.raises(JobSetupError, match="--batch-ms 0"):
        batch_jars()
