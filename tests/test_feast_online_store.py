"""UGT's Feast online-store extension without Redis: its protobuf values are Feast's, its config follows UGT_*."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.modules.setdefault("torch", None)  # feast imports torch when it can; nothing here needs it

from feast.repo_config import load_repo_config  # noqa: E402
from feast.type_map import python_values_to_proto_values  # noqa: E402

from infra.feast_online_store import UgtRedisOnlineStoreConfig, entry_builder  # noqa: E402
from infra.feast_store import FeastRedisLayout, repo_feature_views  # noqa: E402

REPO = Path(__file__).resolve().parents[1] / "feature_repo"
ROWS = {
    "user_recent_events": {"user_id": "u-ü", "recent_item_ids": ["a", "b"], "recent_action_tokens": [2, 3],
                           "recent_rating_tokens": [8, 0], "recent_event_times": [1, 2], "event_count": 2,
                           "last_event_time": 2, "state_version": 2},
    "user_long_term": {"user_id": "u", "long_group_counts": [3], "long_group_first_times": [1],
                       "long_group_last_times": [9], "long_group_rating_sums": [20], "long_group_item_ids": ["x"],
                       "action_counts": [0, 4], "last_context_tokens": [], "last_hour_token": 5,
                       "last_domain": "movie", "compacted_event_count": 4, "state_version": 2},
    "item_metadata": {"item_id": "i", "title": "T", "domain": "movie", "categories": ["c"], "year": None,
                      "semantic_ids": [1, 2, 3]},
}


@pytest.mark.parametrize("view_name", list(ROWS))
def test_entries_hold_the_values_feast_builds(view_name):
    view = repo_feature_views(REPO)[view_name]
    row = ROWS[view_name]
    stamp = datetime(2030, 1, 1, tzinfo=timezone.utc)
    [(key, values, at, created)] = entry_builder(view)([row], stamp)
    join_key = view.entity_columns[0].name
    assert list(key.join_keys) == [join_key] and key.entity_values[0].string_val == row[join_key]
    assert (at, created) == (stamp, None)
    for field in view.features:
        [feast_value] = python_values_to_proto_values([row[field.name]], field.dtype.to_value_type())
        assert values[field.name] == feast_value, field.name


def test_entries_refuse_a_row_without_a_feature():
    view = repo_feature_views(REPO)["item_metadata"]
    row = {k: v for k, v in ROWS["item_metadata"].items() if k != "title"}
    with pytest.raises(KeyError, match="title"):
        entry_builder(view)([row], datetime.now(timezone.utc))


def test_config_reaches_the_stack_redis(monkeypatch):
    monkeypatch.delenv("UGT_REDIS_URL", raising=False)
    monkeypatch.setenv("UGT_REDIS_PORT", "16380")
    assert UgtRedisOnlineStoreConfig().connection_string == "localhost:16380,db=0"
    config = load_repo_config(REPO, REPO / "feature_store.yaml")
    assert isinstance(config.online_store, UgtRedisOnlineStoreConfig)
    assert config.online_store.connection_string == "localhost:16380,db=0"


def test_layout_from_the_repo_accepts_the_extension_and_refuses_other_stores(tmp_path):
    assert FeastRedisLayout.from_repo(REPO) == FeastRedisLayout("ugt", 3)
    (tmp_path / "feature_store.yaml").write_text("project: p\nonline_store:\n  type: sqlite\n")
    with pytest.raises(ValueError, match="need a Redis online store"):
        FeastRedisLayout.from_repo(tmp_path)
    (tmp_path / "feature_store.yaml").write_text("project: p\nonline_store:\n  type: redis\n  redis_type: redis_cluster\n")
    assert FeastRedisLayout.from_repo(tmp_path) == FeastRedisLayout("p", 3)  # same keys on a Redis Cluster
    (tmp_path / "feature_store.yaml").write_text("project: p\nonline_store:\n  type: redis\n  redis_type: redis_sentinel\n")
    with pytest.raises(ValueError, match="redis_type one of"):
        FeastRedisLayout.from_repo(tmp_path)


def test_the_cluster_profile_points_feast_at_the_redis_cluster(monkeypatch):
    monkeypatch.delenv("UGT_REDIS_URL", raising=False)
    monkeypatch.setenv("UGT_PROFILE", "cluster")
    monkeypatch.setenv("UGT_REDIS_PORT", "26379")
    config = UgtRedisOnlineStoreConfig()
    assert config.connection_string == ",".join(f"localhost:{p}" for p in range(26380, 26386))
    assert config.redis_type.value == "redis_cluster"
    monkeypatch.setenv("UGT_PROFILE", "single")
    assert UgtRedisOnlineStoreConfig().redis_type.value == "redis"


def test_the_benchmarks_feast_free_state_writer_stores_feasts_bytes():
    """bench/state_bytes.py writes states on the GPU machine (no Feast there): same bytes as write_rows stores."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from bench.state_bytes import FEATURE_VIEW, KEY_TTL_S, state_fields
    from infra.feast_store import feature_field

    view = repo_feature_views(REPO)[FEATURE_VIEW]
    stamp = datetime(2030, 1, 1, 12, 30, 5, 250_000, tzinfo=timezone.utc)
    for row in (ROWS[FEATURE_VIEW], {**ROWS[FEATURE_VIEW], "recent_item_ids": [], "event_count": 0}):
        [(_, values, at, _)] = entry_builder(view)([row], stamp)
        ts = Timestamp()
        ts.FromDatetime(at)
        want = {feature_field(FEATURE_VIEW, name): value.SerializeToString() for name, value in values.items()}
        want[f"_ts:{FEATURE_VIEW}".encode()] = ts.SerializeToString()
        assert state_fields(row, stamp) == want
    config = load_repo_config(REPO, REPO / "feature_store.yaml")
    assert config.online_store.key_ttl_seconds == KEY_TTL_S
