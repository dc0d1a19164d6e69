"""Open the project's Feast repo, and name the Redis keys its online store writes.

`feature_repo/feature_store.yaml` sets `online_store.type` to UGT's Feast extension
(infra/feast_online_store.py: Feast's RedisOnlineStore plus a batch writer), which takes its Redis address
from UGT_REDIS_URL / UGT_REDIS_PORT, so the plain `feast` CLI and UGT's processes reach the same Redis.

:class:`FeastRedisLayout` is the key layout of that store (Feast 0.67's Redis format), kept free of the
Feast SDK so that serving's direct reader does not pay Feast's import (seconds); tests/integration/
test_feast_paths.py checks it against what Feast itself writes and reads.
"""

from __future__ import annotations

import importlib
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mmh3
import yaml

from infra.settings import Settings, get_settings

# The online store class feature_store.yaml names, and Feast's own Redis store: both write the same layout.
UGT_ONLINE_STORE = "infra.feast_online_store.UgtRedisOnlineStore"
LAYOUT_STORE_TYPES = ("redis", UGT_ONLINE_STORE)
LAYOUT_REDIS_TYPES = ("redis", "redis_cluster")
_STRING_TYPE = 2  # feast ValueType.STRING, as written into serialized entity keys


def redis_connection_string(settings: Settings) -> str:
    """Feast's form of Settings.redis_url: `host:port,db=N` for one node, `host:port,host:port,...` for a cluster."""
    from infra.redis_client import cluster_nodes, is_cluster_url

    if is_cluster_url(settings.redis_url):
        return ",".join(f"{host}:{port}" for host, port in cluster_nodes(settings.redis_url))
    parsed = urlparse(settings.redis_url)
    db = (parsed.path or "/0").lstrip("/") or "0"
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 6379},db={db}"


def redis_type(settings: Settings) -> str:
    """Feast's `redis_type`: `redis_cluster` when Settings.redis_url names a cluster (the cluster profile)."""
    from infra.redis_client import is_cluster_url

    return "redis_cluster" if is_cluster_url(settings.redis_url) else "redis"


def open_feature_store(settings: Settings | None = None, repo: Path | None = None):  # -> feast.FeatureStore
    """A FeatureStore for the repo, its online store pointed at the Redis of ``settings`` (a node or a cluster)."""
    from feast import FeatureStore
    from feast.infra.online_stores.redis import RedisType
    from feast.repo_config import load_repo_config

    settings = settings or get_settings()
    repo = Path(repo or settings.feature_repo)
    config = load_repo_config(repo, repo / "feature_store.yaml")
    config.online_store.connection_string = redis_connection_string(settings)
    config.online_store.redis_type = RedisType(redis_type(settings))
    return FeatureStore(repo_path=str(repo), config=config)


def repo_feature_views(repo: Path | None = None) -> dict[str, Any]:  # name -> feast.FeatureView
    """The feature views the repo's ``features.py`` defines, with the entity columns `feast apply` infers,
    without a registry (for code that only needs their schemas, e.g. bench/user_state_cost.py).

    Imported as `feast apply` imports it: the repo folder on sys.path (its modules import each other by name).
    """
    repo = Path(repo or get_settings().feature_repo).resolve()
    path = str(repo)
    sys.path.insert(0, path)
    try:
        features = importlib.import_module("features")
    finally:
        sys.path.remove(path)
    if Path(features.__file__).resolve().parent != repo:
        raise ImportError(f"a module named `features` from {features.__file__} shadows {repo / 'features.py'}")
    from feast import Entity, FeatureView, Field
    from feast.types import from_value_type

    entities = {e.name: e for e in vars(features).values() if isinstance(e, Entity)}
    views = {v.name: v for v in vars(features).values() if isinstance(v, FeatureView)}
    for view in views.values():  # the entity columns `feast apply` infers from the views' entities
        if not view.entity_columns:
            view.entity_columns = [
                Field(name=entities[name].join_key, dtype=from_value_type(entities[name].value_type))
                for name in view.entities
            ]
    return views


@dataclass(frozen=True)
class FeastRedisLayout:
    """What decides the Redis key names: the Feast project and the key serialization version.

    Feast 0.67's Redis online store keeps one hash per entity: the key is the serialized entity key
    (entity_key_serialization_version 3) followed by the project name; each feature is a field named by
    the murmur3 hash of ``"<view>:<feature>"`` holding a serialized ``feast.types.Value``, and
    ``_ts:<view>`` holds the event timestamp.
    """

    project: str
    entity_key_serialization_version: int = 3

    @classmethod
    def from_repo(cls, repo: Path) -> FeastRedisLayout:
        """Read ``feature_store.yaml`` and refuse layouts this reader does not implement."""
        config = yaml.safe_load((Path(repo) / "feature_store.yaml").read_text()) or {}
        version = int(config.get("entity_key_serialization_version", 3))
        if version != 3:
            raise ValueError(
                f"direct Redis reads need entity_key_serialization_version 3, the repo has {version}"
            )
        registry = config.get("registry")
        if isinstance(registry, dict) and registry.get("enable_online_feature_view_versioning"):
            raise ValueError("direct Redis reads do not support enable_online_feature_view_versioning")
        online = config.get("online_store") or {}
        # a Redis Cluster holds the same keys (each entity's hash is one key, so one slot): the layout is the same
        if online.get("type") not in LAYOUT_STORE_TYPES or online.get("redis_type", "redis") not in LAYOUT_REDIS_TYPES:
            raise ValueError(
                f"direct Redis reads need a Redis online store (type one of {LAYOUT_STORE_TYPES}, redis_type one of "
                f"{LAYOUT_REDIS_TYPES}), got {online}"
            )
        return cls(project=str(config["project"]), entity_key_serialization_version=version)

    def entity_key(self, join_key: str, value: str) -> bytes:
        """Feast's serialize_entity_key (v3, one string join key) followed by the project name."""
        key = join_key.encode("utf-8")
        val = value.encode("utf-8")
        return b"".join(
            (
                struct.pack("<I", 1),
                struct.pack("<I", _STRING_TYPE),
                struct.pack("<I", len(key)),
                key,
                struct.pack("<I", _STRING_TYPE),
                struct.pack("<I", len(val)),
                val,
                self.project.encode("utf-8"),
            )
        )


def feature_field(view: str, feature: str) -> bytes:
    """The hash field of one feature: murmur3_32 of ``view:feature``, 4 bytes little endian (Feast's _mmh3)."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))
