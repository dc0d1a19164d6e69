"""Open the project's Feast repo with the Redis address of the running stack.

`feature_repo/feature_store.yaml` names Redis at its default port so the plain `feast` CLI works;
UGT's own processes (jobs, serving, tests) open the store here so that UGT_REDIS_PORT / UGT_REDIS_URL
overrides reach Feast too.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from infra.settings import Settings, get_settings


def redis_connection_string(settings: Settings) -> str:
    """Feast's `host:port,db=N` form of Settings.redis_url."""
    parsed = urlparse(settings.redis_url)
    db = (parsed.path or "/0").lstrip("/") or "0"
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 6379},db={db}"


def open_feature_store(settings: Settings | None = None, repo: Path | None = None):  # -> feast.FeatureStore
    """A FeatureStore for the repo, its online store pointed at the stack's Redis."""
    from feast import FeatureStore
    from feast.repo_config import load_repo_config

    settings = settings or get_settings()
    repo = Path(repo or settings.feature_repo)
    config = load_repo_config(repo, repo / "feature_store.yaml")
    config.online_store.connection_string = redis_connection_string(settings)
    return FeatureStore(repo_path=str(repo), config=config)
