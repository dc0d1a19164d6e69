"""The rebuild from the lake writes what the user_state operator wrote: same rows, same popularity, no event twice."""

from __future__ import annotations

import pandas as pd
from job_events import make_event
from test_user_state_logic import CONFIG, Job, Sink, stream

from contracts.tokenizer import tokenize_event
from jobs.lake import lake_values
from jobs.user_state_rebuild import fold_lake, lake_events, popularity_batches, write_rebuilt


def lake_frame(events) -> pd.DataFrame:
    """The lake's rows for events read from raw partition 0 in this order, shuffled as a dt-partitioned read is."""
    from jobs.lake import LAKE_FIELDS

    rows = [lake_values(e, 0, offset) for offset, e in enumerate(events)]
    frame = pd.DataFrame(rows, columns=[name for name, _ in LAKE_FIELDS])
    return frame.sample(frac=1.0, random_state=7)


def job_output(events) -> Sink:
    sink = Sink()
    job = Job(sink, {}, set(), CONFIG, max_rows=4)
    for i, event in enumerate(events):
        job.event(event, now_ms=i * 1000)
    job.advance(10 ** 9)  # every confirm and compaction timer fires
    return sink


def rebuild_into(sink: Sink, events) -> None:
    rebuilt = fold_lake(lake_events(lake_frame(events)), CONFIG.max_events, CONFIG.allowed_lateness_ms)
    write_rebuilt(rebuilt, sink.write_rows, sink.write_long_rows, sink.incr, batch_rows=2)


def test_lake_events_come_back_in_consumption_order_with_their_fields():
    events = stream(3, 5)
    assert lake_events(lake_frame(events)) == events


def test_rebuild_into_an_empty_store_equals_what_the_job_wrote():
    events = stream()  # interleaved users, out-of-order events, one late event, one duplicate
    written = job_output(events)
    rebuilt = Sink()  # Redis lost everything
    rebuild_into(rebuilt, events)
    assert rebuilt.rows == written.rows
    assert rebuilt.long_rows == written.long_rows
    assert rebuilt.popularity == written.popularity
    assert rebuilt.applied == written.applied  # the resumed job's replays are recognised


def test_rebuilding_twice_or_over_surviving_data_counts_no_event_twice():
    events = stream(4, 30)
    written = job_output(events)
    partial = Sink()
    rebuild_into(partial, events[: len(events) // 2])  # e.g. the part that survived
    rebuild_into(partial, events)
    rebuild_into(partial, events)
    assert partial.popularity == written.popularity and partial.rows == written.rows


def test_late_and_duplicate_events_are_counted_as_the_job_counts_them():
    events = stream(2, 10)
    rebuilt = fold_lake(events, CONFIG.max_events, CONFIG.allowed_lateness_ms)
    assert (rebuilt.late, rebuilt.duplicates) == (1, 1)
    assert sum(len(items) for users in rebuilt.increments.values() for _, items in users.values()) == len(events) - 2


def test_popularity_batches_never_split_a_user():
    events = [tokenize_event(make_event(i, user=f"u{i % 3}")) for i in range(30)]
    increments = fold_lake(events).increments
    parts = list(popularity_batches(increments, max_items=12))
    assert len(parts) == 3
    merged = {user: entry for part in parts for user, entry in part["movie"].items()}
    assert merged == increments["movie"]
