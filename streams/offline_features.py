"""Write a dataset into Feast's offline store (parquet): item metadata and user-state snapshots (recent and
long term), the batch sources of every view `feast materialize` loads.

This is the batch side of the same features the stream keeps fresh: the user snapshots are computed
with the ONE tokenizer and the ONE state rule the Flink jobs use (contracts.tokenizer, contracts.user_state_rule),
so `feast materialize` of a historical dataset puts exactly what the stream would have computed into
Redis. Feast's Redis store keeps the newer row per entity, so materializing old snapshots never
overwrites fresher state written by the `user_state` job.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm import tqdm

from contracts.datasets import Dataset, item_events, user_events
from contracts.tokenizer import tokenize_event
from contracts.user_state_rule import DEFAULT_MAX_EVENTS, compact, long_term_row, states_from_events


def item_metadata_frame(dataset: Dataset) -> pd.DataFrame:
    """Rows of the `item_metadata` feature view (semantic IDs are filled in by the item job later)."""
    rows = []
    for event in item_events(dataset):
        year = event["attributes"].get("year")
        rows.append(
            {
                "item_id": event["item_id"],
                "title": event["title"],
                "domain": event["domain"],
                "categories": event["categories"],
                "year": int(year) if year else None,
                "semantic_ids": [],
                "event_timestamp": pd.Timestamp(event["updated_at"], unit="ms", tz="UTC"),
            }
        )
    frame = pd.DataFrame(rows)
    frame["year"] = frame["year"].astype("Int64")
    return frame


def user_state_frames(dataset: Dataset, max_events: int = DEFAULT_MAX_EVENTS,
                      progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of `user_recent_events` and `user_long_term`: one per user, the state after all of the user's
    events (long term: fully compacted), stamped with the last event's time."""
    tokens = (
        tokenize_event(e)
        for e in tqdm(user_events(dataset), total=len(dataset.ratings), desc="user state", unit="ev",
                      unit_scale=True, disable=not progress, mininterval=0.5)
    )
    states = states_from_events(tokens, max_events)
    recent, long_term = [], []
    for state in states.values():
        stamp = pd.Timestamp(state.last_event_time, unit="ms", tz="UTC")
        recent.append({**state.to_feature_row(), "event_timestamp": stamp})
        # compact() empties the spill, so the recent row is taken first
        long_term.append({**long_term_row(compact(None, state), state), "event_timestamp": stamp})
    return pd.DataFrame(recent), pd.DataFrame(long_term)


def write_offline_features(dataset: Dataset, repo: Path, progress: bool = True) -> dict[str, int]:
    """Write the batch source of every materialized view: feature_repo/data/{item_metadata,
    user_recent_events,user_long_term}.parquet; returns rows per file."""
    data = Path(repo) / "data"
    data.mkdir(parents=True, exist_ok=True)
    recent, long_term = user_state_frames(dataset, progress=progress)
    written = {}
    for name, frame in (
        ("item_metadata", item_metadata_frame(dataset)),
        ("user_recent_events", recent),
        ("user_long_term", long_term),
    ):
        path = data / f"{name}.parquet"
        tmp = path.with_suffix(".parquet.part")
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)
        written[str(path)] = len(frame)
    return written
