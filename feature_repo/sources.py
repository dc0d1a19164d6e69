"""Sources: parquet files are the offline store; push sources let the Flink jobs write online at once."""

import os
from pathlib import Path

from feast import FileSource, PushSource

DATA = Path(__file__).resolve().parent / "data"

user_recent_events_batch = FileSource(
    name="user_recent_events_batch",
    path=str(DATA / "user_recent_events.parquet"),
    timestamp_field="event_timestamp",
    description="Snapshots of each user's recent-event state (written by the user_state job and backfills).",
)

# The user_state job pushes every updated state here (PushMode.ONLINE, or ONLINE_AND_OFFLINE).
user_recent_events_push = PushSource(name="user_recent_events_push", batch_source=user_recent_events_batch)

user_long_term_batch = FileSource(
    name="user_long_term_batch",
    path=str(DATA / "user_long_term.parquet"),
    timestamp_field="event_timestamp",
    description="Snapshots of each user's compacted long-term state (nearline path of the user_state job).",
)

user_long_term_push = PushSource(name="user_long_term_push", batch_source=user_long_term_batch)

item_metadata_batch = FileSource(
    name="item_metadata_batch",
    path=str(DATA / "item_metadata.parquet"),
    timestamp_field="event_timestamp",
    description="Item catalog metadata (from items.catalog events or `ugt data fetch`).",
)

item_metadata_push = PushSource(name="item_metadata_push", batch_source=item_metadata_batch)

# The token data lake the tokenize job writes (jobs/lake.py: parquet under dt=YYYY-MM-DD partitions, committed on
# Flink checkpoints), as the compacted snapshot `python -m jobs.lake snapshot` makes of it (Feast's dask reader
# cannot join over the partitioned folder itself). UGT_VAR moves var/ (infra/settings.py) and so the lake.
events_tokens_lake = FileSource(
    name="events_tokens_lake",
    path=str(Path(os.environ.get("UGT_VAR", str(Path(__file__).resolve().parent.parent / "var")))
             / "lake" / "events_tokens.parquet"),
    timestamp_field="event_ts",
    description="Every tokenized event (tokenize job's parquet lake, compacted); Feast's offline history of events.",
)
