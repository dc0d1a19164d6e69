"""infra/redis_client.py: which URL opens which client (a real cluster is in tests/integration/test_stack_cluster.py)."""

from __future__ import annotations

import pytest
import redis

from infra.redis_client import cluster_nodes, is_cluster_url, redis_from_url


def test_a_cluster_url_names_its_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UGT_REDIS_CLUSTER", raising=False)
    url = "redis+cluster://localhost:26380,127.0.0.1:26381,[::1]:26382"
    assert is_cluster_url(url) and not is_cluster_url("redis://localhost:6379/0")
    assert cluster_nodes(url) == [("localhost", 26380), ("127.0.0.1", 26381), ("::1", 26382)]
    assert cluster_nodes("redis://localhost:7000/0") == [("localhost", 7000)]
    monkeypatch.setenv("UGT_REDIS_CLUSTER", "1")  # a plain URL of one cluster node counts as the cluster
    assert is_cluster_url("redis://localhost:7000/0")
    with pytest.raises(ValueError, match="not a host:port"):
        cluster_nodes("redis+cluster://localhost:1,")


def test_a_plain_url_opens_a_plain_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UGT_REDIS_CLUSTER", raising=False)
    client = redis_from_url("redis://localhost:16999/2", socket_timeout=1)
    assert type(client) is redis.Redis
    assert client.connection_pool.connection_kwargs["db"] == 2
