"""bench.proc_cpu.in_scope: on a box shared by several stacks, only one stack's processes are counted."""

from __future__ import annotations

from bench.proc_cpu import in_scope

SCOPE = ("/work/wt/fresh/var", ":36379")


def test_the_stacks_own_processes_are_in_scope() -> None:
    assert in_scope("java -Dlog.file=/work/wt/fresh/var/log/flink/tm.log TaskManagerRunner", SCOPE)
    assert in_scope("redis-server 127.0.0.1:36379", SCOPE)


def test_other_stacks_processes_are_not() -> None:
    assert not in_scope("java -Dlog.file=/work/wt/absim/var/log/flink/tm.log TaskManagerRunner", SCOPE)
    assert not in_scope("redis-server 127.0.0.1:56379", SCOPE)


def test_no_scope_counts_everything() -> None:
    assert in_scope("java kafka.Kafka /elsewhere/server.properties", ())
