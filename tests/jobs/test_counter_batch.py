"""jobs/operators/counters.py: counts reach the (fake) Flink counters in sums, none lost."""

from __future__ import annotations

from jobs.operators.counters import CounterBatch


class FakeCounter:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def inc(self, n: int = 1) -> None:
        self.calls.append(n)

    @property
    def total(self) -> int:
        return sum(self.calls)


def test_sums_every_n_records_and_on_flush() -> None:
    now = [0.0]
    counters = {"events": FakeCounter(), "applied": FakeCounter()}
    batch = CounterBatch(counters, every=4, max_age_s=60.0, clock=lambda: now[0])
    for i in range(10):
        batch.add("events")
        if i % 2 == 0:
            batch.add("applied")
        batch.record()
    assert counters["events"].calls == [4, 4] and counters["applied"].calls == [2, 2]
    batch.flush()
    assert counters["events"].total == 10 and counters["applied"].total == 5
    batch.flush()  # nothing pending: no calls into the JVM
    assert len(counters["events"].calls) == 3 and len(counters["applied"].calls) == 3


def test_flushes_after_max_age_even_when_slow() -> None:
    now = [0.0]
    counters = {"events": FakeCounter()}
    batch = CounterBatch(counters, every=1000, max_age_s=1.0, clock=lambda: now[0])
    batch.add("events", 3)
    batch.record()
    assert counters["events"].calls == []
    now[0] = 1.5
    batch.add("events")
    batch.record()
    assert counters["events"].calls == [4]
