"""user_state's exactly-once effect under many random crashes, without Flink (issue #20).

Each seed replays interleaved users through the operator (tests/jobs/test_user_state_logic.py's harness: keyed
state in a dict, Flink's timer order), takes checkpoints at random points, and crashes up to three times, half of
them inside a flush that wrote the rows and died before the popularity increments (Redis killed between the two).
Every crash restores the last checkpoint into a new incarnation and replays from its offset; what reached the
store before the crash stays there, as on a Redis with the AOF. At the end the store must equal the offline fold:
every row, and every event counted once. Small state caches and batch sizes are drawn too, so users are evicted and
reloaded from their snapshot + log mid-stream.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from job_events import make_event
from test_user_state_logic import CONFIG, Job, Sink, expected

from contracts.tokenizer import tokenize_event


class RedisDied(Exception):
    pass


class DyingSink(Sink):
    """The online store; `die_before_popularity` makes the next popularity write fail (rows already written)."""

    def __init__(self) -> None:
        super().__init__()
        self.die_before_popularity = False

    def incr(self, batch):
        if self.die_before_popularity:
            self.die_before_popularity = False
            raise RedisDied()
        super().incr(batch)


def random_run(seed: int) -> tuple[Sink, list, int]:
    rnd = random.Random(seed)
    n_users, per_user = rnd.randint(1, 6), rnd.randint(5, 40)
    events = []
    for i in range(per_user):
        for u in rnd.sample(range(n_users), n_users):
            events.append(tokenize_event(make_event(len(events), user=f"u{u}", t_ms=1_600_000_000_000 + i * 60_000)))
    config = replace(CONFIG, cache_size=rnd.choice([0, 1, 2, 5_000]), flush_ms=rnd.choice([50, 200, 1_000]))
    max_rows = rnd.choice([1, 2, 3, 10_000])
    sink = DyingSink()
    checkpoint: tuple[dict, set, int] = ({}, set(), 0)
    now, crashes = 0, 0
    while True:
        data, timers, offset = checkpoint
        job = Job(sink, dict(data), set(timers), config, max_rows=max_rows)  # a new incarnation
        try:
            for i in range(offset, len(events)):
                now += rnd.choice([1, 5, 20, 100, 300])
                job.advance(now)
                job.event(events[i], now)
                if rnd.random() < 0.1:
                    checkpoint = (*job.snapshot(), i + 1)
                if crashes < 3 and rnd.random() < 0.03:
                    if rnd.random() < 0.5:
                        sink.die_before_popularity = True
                        job.processor.writer.flush()
                    raise RedisDied()
            job.advance(now + 10_000_000)  # every confirm and compaction timer fires
            return sink, events, crashes
        except RedisDied:
            crashes += 1


@pytest.mark.parametrize("seed", range(40))
def test_random_crashes_lose_nothing_and_count_nothing_twice(seed: int):
    sink, events, crashes = random_run(seed)
    rows, long_rows, popularity, _ = expected(events)
    assert sink.popularity == popularity, f"{crashes} crashes"
    assert sink.rows == rows and sink.long_rows == long_rows


def test_the_seeds_do_crash():
    assert sum(random_run(seed)[2] for seed in range(40)) >= 20
