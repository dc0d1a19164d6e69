"""One way to open the stack's Redis: a plain client for one node, a cluster client for a Redis Cluster.

Every direct Redis path (the jobs' writes, the popularity sets, the semantic-ID index, serving's batched reads)
opens its client here, so the same code runs on the single node and on the cluster profile's Redis Cluster.
Which one comes from the URL: ``redis+cluster://host:port,host:port,...`` (what Settings.redis_url gives in the
cluster profile) or any URL while ``UGT_REDIS_CLUSTER=1``; anything else is one node (``redis://``, ``rediss://``,
``unix://``).

A cluster client routes each command by its key's hash slot; a multi-key command or script must name keys of one
slot, which contracts/redis_keys.py arranges with hash tags. redis-py's cluster pipelines are not transactions:
what must be atomic across keys runs as one Lua script.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import redis
from redis.cluster import ClusterNode, RedisCluster

from infra.settings import Settings, get_settings

CLUSTER_SCHEME = "redis+cluster"


def is_cluster_url(url: str) -> bool:
    """Does `url` name a Redis Cluster (its scheme, or UGT_REDIS_CLUSTER=1)?"""
    return url.startswith(f"{CLUSTER_SCHEME}://") or os.environ.get("UGT_REDIS_CLUSTER", "") == "1"


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """(host, port) of each node a cluster URL names (``redis+cluster://h1:p1,h2:p2`` or ``redis://h:p``)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    rest = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    nodes = []
    for part in rest.split(","):
        parsed = urlparse(f"redis://{part.strip()}")
        if not parsed.hostname:
            raise ValueError(f"not a host:port in the Redis cluster URL {url!r}: {part!r}")
        nodes.append((parsed.hostname, parsed.port or 6379))
    return nodes


def redis_from_url(url: str, **kwargs: Any) -> redis.Redis | RedisCluster:
    """A client for `url`: RedisCluster over the nodes it names, or redis.Redis for one node.

    ``kwargs`` go to the client (socket_timeout, socket_connect_timeout, ...); both kinds take the common ones.
    """
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **kwargs)
    startup = [ClusterNode(host, port) for host, port in cluster_nodes(url)]
    # a failover takes node-timeout (5 s) + an election: let a command retry across it before it fails
    kwargs.setdefault("cluster_error_retry_attempts", 10)
    return RedisCluster(startup_nodes=startup, **kwargs)


def redis_client(settings: Settings | None = None, **kwargs: Any) -> redis.Redis | RedisCluster:
    """The stack's Redis (Settings.redis_url) through :func:`redis_from_url`."""
    return redis_from_url((settings or get_settings()).redis_url, **kwargs)
