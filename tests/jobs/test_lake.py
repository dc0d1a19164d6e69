"""The lake readers on a folder laid out the way Flink's filesystem sink writes it (no Flink here)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.tokenizer import tokenize_event
from jobs.lake import LAKE_FIELDS, lake_ratings, lake_sequences, read_lake, write_snapshot

DAY_MS = 86_400_000
ARROW = {"STRING": pa.string(), "BIGINT": pa.int64(), "INT": pa.int32(),
         "ARRAY<BIGINT>": pa.list_(pa.int64()), "ARRAY<INT>": pa.list_(pa.int32())}


def token(i: int, user: str, t_ms: int, rating: float | None = 4.0):
    return tokenize_event({"event_id": f"e{i}", "user_id": user, "item_id": f"m{i % 5}", "action": "RATE",
                           "event_time": t_ms, "rating": rating}, semantic_ids=(i % 3, i), sid_version="v1")


def write_part(lake: Path, dt: str, rows: list, name: str | None = None) -> Path:
    """One part file as Flink names it (part-<uuid>-<subtask>-<n>, no suffix); dt is the folder."""
    columns = {n: [] for n, _ in LAKE_FIELDS}
    columns["event_ts"] = []
    for t, partition, offset in rows:
        values = dict(zip([n for n, _ in LAKE_FIELDS], [
            t.event_id, t.user_id, t.item_id, t.event_time, t.domain, t.action_token, t.rating_token,
            t.duration_token, t.hour_token, t.weekday_token, list(t.context_tokens), list(t.semantic_ids),
            t.sid_version, t.tokenizer_version, partition, offset], strict=True))
        for k, v in values.items():
            columns[k].append(v)
        columns["event_ts"].append(t.event_time)
    schema = pa.schema([(n, ARROW[k]) for n, k in LAKE_FIELDS] + [("event_ts", pa.timestamp("ms"))])
    folder = lake / f"dt={dt}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"part-{uuid.uuid4()}-0-0")
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


@pytest.fixture()
def lake(tmp_path: Path) -> Path:
    root = tmp_path / "events_tokens"
    day1, day2 = 978_220_800_000, 978_220_800_000 + DAY_MS  # 2000-12-31, 2001-01-01
    write_part(root, "2000-12-31", [(token(1, "a", day1 + 5), 0, 1), (token(2, "a", day1 + 9), 0, 2)])
    write_part(root, "2001-01-01", [(token(3, "b", day2 + 1, rating=None), 1, 7), (token(4, "a", day2 + 2), 0, 3)])
    # a replay that wrote event e2 again, an in-progress file and the commit marker: none may count twice
    write_part(root, "2000-12-31", [(token(2, "a", day1 + 9), 0, 2)])
    write_part(root, "2001-01-01", [(token(9, "z", day2), 0, 9)], name=".part-x-0-1.inprogress.abc")
    (root / "dt=2001-01-01" / "_SUCCESS").write_text("")
    return root


def test_read_lake_dedups_skips_hidden_files_and_orders_by_time(lake: Path):
    frame = read_lake(lake)
    assert list(frame["event_id"]) == ["e1", "e2", "e3", "e4"]
    assert list(frame["dt"]) == ["2000-12-31", "2000-12-31", "2001-01-01", "2001-01-01"]
    assert [list(s) for s in frame["semantic_ids"]] == [[1, 1], [2, 2], [0, 3], [1, 4]]
    assert list(read_lake(lake, start="2001-01-01")["event_id"]) == ["e3", "e4"]
    assert list(read_lake(lake, end="2000-12-31")["event_id"]) == ["e1", "e2"]


def test_lake_ratings_is_the_trainers_frame(lake: Path):
    ratings = lake_ratings(lake)
    assert list(ratings["user_id"]) == ["a", "a", "b", "a"]
    assert list(ratings["timestamp"]) == [978_220_800, 978_220_800, 978_307_200, 978_307_200]
    assert ratings["rating"].iloc[0] == 4.0 and ratings["rating"].isna().iloc[2]
    assert list(ratings["row"]) == [0, 1, 2, 3] and set(ratings["action"]) == {"RATE"}
    data = lake_sequences(lake, "stable")
    assert sorted(data.user_ids) == ["a", "b"]


def test_snapshot_is_one_file_with_utc_timestamps(lake: Path):
    path, rows = write_snapshot(lake)
    assert path == lake.with_name("events_tokens.parquet") and rows == 4
    table = pq.read_table(path)
    assert table.schema.field("event_ts").type == pa.timestamp("ms", tz="UTC")
    assert table.column("event_id").to_pylist() == ["e1", "e2", "e3", "e4"]


def test_empty_lake_says_what_to_run(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="run the tokenize job"):
        read_lake(tmp_path / "nothing")


@pytest.mark.slow  # feast apply + import: ~30 s on an idle 2-core box, minutes under load
def test_feast_reads_the_lake_snapshot(lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`feast apply` of the project's repo, then a point-in-time join over the user_events_lake view."""
    import shutil
    import subprocess
    import sys

    import pandas as pd

    from infra.settings import REPO_ROOT

    var = tmp_path / "var"
    shutil.copytree(lake, var / "lake" / "events_tokens")
    write_snapshot(var / "lake" / "events_tokens")
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("registry.db", "__pycache__"))
    monkeypatch.setenv("UGT_VAR", str(var))  # feature_repo/sources.py finds the lake under UGT_VAR
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the CLI imports this checkout's Feast online store class
    feast = str(Path(sys.executable).parent / "feast")
    done = subprocess.run([feast, "-c", str(repo), "apply"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo))
    at = pd.to_datetime(["2000-12-31 12:00", "2001-01-02 00:00", "2001-01-02 00:00"], utc=True)
    entity = pd.DataFrame({"user_id": ["a", "a", "b"], "event_timestamp": at})
    got = store.get_historical_features(
        entity_df=entity, features=["user_events_lake:item_id", "user_events_lake:semantic_ids"]).to_df()
    got = got.sort_values(["user_id", "event_timestamp"]).reset_index(drop=True)
    # the newest event of each user at or before each timestamp: e2 (m2), e4 (m4), e3 (m3)
    assert list(got["item_id"]) == ["m2", "m4", "m3"]
    assert [list(s) for s in got["semantic_ids"]] == [[2, 2], [1, 4], [0, 3]]
