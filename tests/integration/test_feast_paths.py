"""The README's Feast commands as typed, and UGT's fast Feast paths against Feast's own, on a real Redis.

Starts only Redis (infra.stack, UGT_REDIS_PORT). The Feast repo is a copy of feature_repo/ in a temporary
folder with its own project name, so its keys never meet those of another run or of the stack's users.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import redis

from infra import stack as stack_mod
from infra.settings import REPO_ROOT, Settings, get_settings

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PROJECT = f"readme_flow_{os.getpid()}"
DATASET = "ml-100k"
VIEWS = {"user_recent_events": "user_id", "user_long_term": "user_id", "item_metadata": "item_id"}


@pytest.fixture(scope="module")
def redis_only() -> Iterator[Settings]:
    settings = get_settings()
    was_up = any(row["healthy"] for row in stack_mod.status(only=["redis"], settings=settings))
    stack_mod.up(only=["redis"], settings=settings, log=lambda line: None)
    yield settings
    if not was_up and os.environ.get("UGT_STACK_TEARDOWN") == "1":
        stack_mod.down(only=["redis"], settings=settings, log=lambda line: None)


def _sh(*args: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"`{' '.join(args)}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def readme_flow(redis_only: Settings, tmp_path_factory) -> Iterator[dict]:
    """Run README.md's "Feast" commands, as written, in a folder holding a fresh copy of feature_repo/."""
    work = tmp_path_factory.mktemp("feast")
    repo = work / "feature_repo"
    shutil.copytree(REPO_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    config = repo / "feature_store.yaml"
    config.write_text(re.sub(r"(?m)^project: .*$", f"project: {PROJECT}", config.read_text()))
    env = {**os.environ, "UGT_FEATURE_REPO": str(repo), "PYTHONPATH": str(REPO_ROOT)}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    outputs = [_sh(str(BIN / "feast"), "-c", "feature_repo", "apply", cwd=work, env=env)]
    offline = _sh(str(BIN / "ugt"), "data", "offline-features", DATASET, cwd=work, env=env)
    start = re.search(r"feast -c feature_repo materialize (\S+) ", offline)
    assert start, offline
    outputs.append(_sh(str(BIN / "feast"), "-c", "feature_repo", "materialize", start.group(1), now, cwd=work, env=env))
    later = (datetime.now(timezone.utc) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    outputs.append(_sh(str(BIN / "feast"), "-c", "feature_repo", "materialize-incremental", later, cwd=work, env=env))
    os.environ["UGT_FEATURE_REPO"] = str(repo)  # open_feature_store() below opens the copy
    try:
        yield {"repo": repo, "outputs": outputs, "offline": offline}
    finally:
        os.environ.pop("UGT_FEATURE_REPO")
        client = redis.Redis.from_url(redis_only.redis_url)
        keys = list(client.scan_iter(match=f"*{PROJECT}", count=1000))
        if keys:
            client.delete(*keys)


def _store(settings: Settings):
    sys.modules.setdefault("torch", None)  # feast imports torch when it can; nothing here needs it
    from infra.feast_store import open_feature_store

    return open_feature_store(settings)


def test_readme_feast_flow_materializes_every_view(readme_flow, redis_only):
    store = _store(redis_only)
    for view, join_key in VIEWS.items():
        frame = pd.read_parquet(readme_flow["repo"] / "data" / f"{view}.parquet")
        sample = frame.sort_values(join_key).head(20)
        features = [f"{view}:{f.name}" for f in store.get_feature_view(view).features]
        online = store.get_online_features(
            features=features, entity_rows=[{join_key: k} for k in sample[join_key]]
        ).to_dict()
        for i, (_, row) in enumerate(sample.iterrows()):
            for ref in features:
                name = ref.split(":")[1]
                got, want = online[name][i], row[name]
                want = list(want) if hasattr(want, "__len__") and not isinstance(want, str) else want
                if want is None or (not isinstance(want, list) and pd.isna(want)):
                    assert got is None, (view, row[join_key], name, got)
                else:
                    assert got == want, (view, row[join_key], name, got, want)


# ---------------------------------------------------------------------------------------------------------
# the fast paths: our write is what Feast reads, and our read is what Feast wrote
# ---------------------------------------------------------------------------------------------------------
RECENT = {
    "recent_item_ids": ["i1", "ü-2"], "recent_action_tokens": [2, 3], "recent_rating_tokens": [8, 0],
    "recent_event_times": [1_000, 2_000], "event_count": 7, "last_event_time": 2_000, "state_version": 2,
}
LONG = {
    "long_group_counts": [3], "long_group_first_times": [10], "long_group_last_times": [30],
    "long_group_rating_sums": [24], "long_group_item_ids": ["a", "b"], "action_counts": [0, 0, 5],
    "last_context_tokens": [], "last_hour_token": 4, "last_domain": "movie", "compacted_event_count": 5,
    "state_version": 2,
}
ITEM = {"title": "Toy Story", "domain": "movie", "categories": ["Animation"], "year": None, "semantic_ids": [1, 2]}
ROWS = {"user_recent_events": ("user_id", RECENT), "user_long_term": ("user_id", LONG),
        "item_metadata": ("item_id", ITEM)}


def _hash(client: redis.Redis, layout, join_key: str, key: str) -> dict[bytes, bytes]:
    return client.hgetall(layout.entity_key(join_key, key))


@pytest.mark.parametrize("view_name", list(ROWS))
def test_write_rows_stores_the_bytes_feast_writes(readme_flow, redis_only, view_name):
    """Same rows, same timestamp: Feast's public write_to_online_store and our write_rows leave identical
    hashes, Feast's get_online_features reads ours back, and serving's layout names the same key."""
    from infra.feast_online_store import open_online_store
    from infra.feast_store import FeastRedisLayout

    store = _store(redis_only)
    view = store.get_feature_view(view_name)
    join_key, features = ROWS[view_name]
    client = redis.Redis.from_url(redis_only.redis_url)
    layout = FeastRedisLayout.from_repo(readme_flow["repo"])
    assert layout.project == PROJECT
    stamp = datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=timezone.utc)

    feast_key, ours_key = f"feast-{view_name}", f"ours-{view_name}"
    frame = pd.DataFrame([{join_key: feast_key, **features, "event_timestamp": stamp}])
    store.write_to_online_store(view_name, frame)
    open_online_store(store).write_rows(store.config, view, [{join_key: ours_key, **features}], stamp)

    by_feast, by_us = _hash(client, layout, join_key, feast_key), _hash(client, layout, join_key, ours_key)
    assert by_feast, "serving's layout does not name the key Feast wrote"
    assert by_us == by_feast
    online = store.get_online_features(
        features=[f"{view_name}:{name}" for name in features], entity_rows=[{join_key: ours_key}]
    ).to_dict()
    assert {name: online[name][0] for name in features} == features


def test_serving_reader_reads_what_feast_writes(readme_flow, redis_only):
    """serving.user_state_reader.RedisStateReader (one HMGET, no SDK) = FeastStateReader on a row Feast itself wrote."""
    from infra.feast_store import FeastRedisLayout
    from serving.user_state_reader import FeastStateReader, RedisStateReader, UserStateView

    store = _store(redis_only)
    client = redis.Redis.from_url(redis_only.redis_url)
    frame = pd.DataFrame([{"user_id": "feast-reader", **RECENT, "event_timestamp": datetime.now(timezone.utc)}])
    store.write_to_online_store("user_recent_events", frame)
    direct = RedisStateReader(client, FeastRedisLayout.from_repo(readme_flow["repo"]), "user_recent_events")
    sdk = FeastStateReader(store, "recommend_v1", client)
    expected = UserStateView("feast-reader", ("i1", "ü-2"), (2, 3), (8, 0), (1_000, 2_000), 7, 2_000, 2)
    assert direct.read("feast-reader") == sdk.read("feast-reader") == expected
    assert direct.read_many(["feast-reader", "nobody"]) == [expected, None]
