"""Write a dataset into Feast's offline store (parquet): item metadata and user-state snapshots.

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
from contracts.user_state_rule import DEFAULT_MAX_EVENTS, states_from_events


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


def user_state_frame(dataset: Dataset, max_events: int = DEFAULT_MAX_EVENTS, progress: bool = True) -> pd.DataFrame:
    """One row per user: the state after all of the user's events, stamped with the last event's time."""
    tokens = (
        tokenize_event(e)
        for e in tqdm(user_events(dataset), total=len(dataset.ratings), desc="user state", unit="ev",
                      unit_scale=True, disable=not progress, mininterval=0.5)
    )
    states = states_from_events(tokens, max_events)
    rows = []
    for state in states.values():
        row = state.to_feature_row()
        row["event_timestamp"] = pd.Timestamp(state.last_event_time, unit="ms", tz="UTC")
        rows.append(row)
    return pd.DataFrame(rows)


def write_offline_features(dataset: Dataset, repo: Path, progress: bool = True) -> dict[str, int]:
    """Write feature_repo/data/{item_metadata,user_recent_events}.parquet; returns rows per file."""
    data = Path(repo) / "data"
    data.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frame in (
        ("item_metadata", item_metadata_frame(dataset)),
        ("user_recent_events", user_state_frame(dataset, progress=progress)),
    ):
        path = data / f"{name}.parquet"
        tmp = path.with_suffix(".parquet.part")
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)
        written[str(path)] = len(frame)
    return written
