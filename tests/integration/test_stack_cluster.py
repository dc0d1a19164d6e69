"""The cluster profile on real processes: 3 KRaft brokers with RF 3 topics, a 6-node Redis Cluster (issue #20).

Brings up `kafka` and `redis` of the cluster profile (infra/stack_cluster.py) in its OWN var/ folder and on
its own ports (the stack's ports + 300, so the single-node stack of the same settings may keep running), then
checks what the profile promises:
  * 3 brokers answer, the KRaft quorum has 3 voters, and every pipeline topic has 3 replicas per partition
    and min.insync.replicas=2;
  * the Redis Cluster has 3 masters and 3 replicas serving all 16384 slots, and answers a write + read through
    infra/redis_client.py, the popularity script (its keys share a slot by hash tag), the semantic-ID writer's
    atomic batch, and a Feast row (redis_type redis_cluster) read back by serving's batched reader.
Stopped at the end. Skipped when the box has too little free memory for a second set of engines.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource
from redis.cluster import RedisCluster

from contracts.redis_keys import applied_key, index_key, item_key, popularity_key
from infra import stack as stack_mod
from infra.redis_client import redis_client
from infra.settings import Settings
from jobs.item_semantic_ids_logic import RedisSidIndex
from jobs.popularity_writer import redis_popularity_writer
from streams.topics import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORT_OFFSET = 300
MIN_FREE_GIB = 4.0  # 3 brokers (512 MB heap each) + 6 Redis nodes, beside whatever else runs


@pytest.fixture(scope="module")
def cluster_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    free_gib = psutil.virtual_memory().available / 2**30
    if free_gib < MIN_FREE_GIB:
        pytest.skip(f"the cluster profile needs ~{MIN_FREE_GIB:.0f} GiB free beside the running stack; {free_gib:.1f} "
                    f"GiB available")
    base = Settings()
    env = {"UGT_PROFILE": "cluster", "UGT_VAR": str(base.var_dir / "cluster-profile-test"),
           "UGT_KAFKA_PORT": str(base.kafka_port + PORT_OFFSET),
           "UGT_KAFKA_CONTROLLER_PORT": str(base.kafka_controller_port + PORT_OFFSET),
           "UGT_REDIS_PORT": str(base.redis_port + PORT_OFFSET)}
    saved = {k: os.environ.get(k) for k in (*env, "UGT_REDIS_URL", "UGT_KAFKA_BOOTSTRAP")}
    os.environ.update(env)
    os.environ.pop("UGT_REDIS_URL", None)
    os.environ.pop("UGT_KAFKA_BOOTSTRAP", None)
    settings = Settings()
    try:
        stack_mod.up(only=["kafka", "redis"], settings=settings, log=print)
        yield settings
    finally:
        stack_mod.down(only=["kafka", "redis"], settings=settings, log=print)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_three_brokers_and_rf3_topics(cluster_settings: Settings) -> None:
    s = cluster_settings
    created = ensure_topics(s)
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap})
    metadata = admin.list_topics(timeout=10)
    deadline = time.monotonic() + 60  # the broker that answers may not have every new topic in its metadata yet
    while not all(name in metadata.topics for name in created):
        assert time.monotonic() < deadline, f"created topics missing from the metadata after 60 s: {created}"
        time.sleep(0.5)
        metadata = admin.list_topics(timeout=10)
    assert sorted(b.port for b in metadata.brokers.values()) == s.kafka_broker_ports
    for name in created:
        assert all(len(p.replicas) == 3 for p in metadata.topics[name].partitions.values()), name
    deadline = time.monotonic() + 90  # after a restart the followers catch up before they are in sync again
    while not all(len(p.isrs) == 3 for name in created for p in metadata.topics[name].partitions.values()):
        assert time.monotonic() < deadline, "not every replica came back in sync within 90 s"
        time.sleep(1)
        metadata = admin.list_topics(timeout=10)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in created]
    for resource, future in admin.describe_configs(resources).items():
        assert future.result(timeout=10)["min.insync.replicas"].value == "2", resource
    quorum = Path(s.var_dir / "kafka" / "broker-1" / "server.properties").read_text()
    assert "controller.quorum.voters=1@localhost:" in quorum and quorum.count("@localhost:") == 3


def test_redis_cluster_of_six_answers_through_the_helper(cluster_settings: Settings) -> None:
    client = redis_client(cluster_settings)
    assert isinstance(client, RedisCluster)
    roles = [node.server_type for node in client.get_nodes()]
    assert sorted(roles) == ["primary"] * 3 + ["replica"] * 3
    run = uuid.uuid4().hex[:8]
    keys = [f"ugt:test:{run}:{i}" for i in range(50)]  # spread over the slots, so over all three masters
    for i, key in enumerate(keys):
        client.set(key, i)
    assert [int(client.get(k)) for k in keys] == list(range(50))
    assert len({client.keyslot(k) for k in keys}) > 40
    assert int(client.cluster_info()["cluster_slots_ok"]) == 16384
    # the popularity script: one call per domain over the ZSET and the users' applied keys (one slot by hash tag)
    domain = f"d{run}"
    incr = redis_popularity_writer(client)
    incr({domain: {"u1": ("o", [(1, "a"), (2, "b")]), "u2": ("o", [(1, "a")])}})
    incr({domain: {"u1": ("o", [(1, "a"), (2, "b")])}})  # a replay counts nothing twice
    assert {k.decode(): v for k, v in client.zrange(popularity_key(domain), 0, -1, withscores=True)} == \
        {"a": 2.0, "b": 1.0}
    assert client.get(applied_key(domain, "u1")).startswith(b"2 ")
    # the semantic-ID writer's atomic batch (index + item + feed of one version in one slot)
    index = RedisSidIndex(client, f"v{run}")
    index.write_new([{"item_id": "i1", "code": "1-2-3-0", "categories": "[]", "year": ""}])
    assert client.hget(index_key(f"v{run}"), "1-2-3-0") == b"i1" and index.lookup(["i1"]) == {"i1": "1-2-3-0"}
    client.delete(*keys, popularity_key(domain), applied_key(domain, "u1"), applied_key(domain, "u2"),
                  index_key(f"v{run}"), item_key(f"v{run}"))


def test_a_feast_row_written_to_the_cluster_is_read_by_serving(cluster_settings: Settings) -> None:
    from contracts.user_state_rule import UserState
    from infra.feast_store import FeastRedisLayout, open_feature_store
    from jobs.user_state_logic import FEATURE_VIEW, feast_direct_writer
    from serving.user_state_reader import RedisStateReader

    store = open_feature_store(cluster_settings)
    assert store.config.online_store.redis_type.value == "redis_cluster"
    try:
        store.get_feature_view(FEATURE_VIEW)
    except Exception:
        pytest.skip("the Feast registry has no user_recent_events view: run `feast -c feature_repo apply` first")
    run = uuid.uuid4().hex[:8]
    users = [f"c{run}-{i}" for i in range(20)]
    rows = [UserState(user_id=u, event_keys=[(1000, "e1"), (2000, "e2")], item_ids=["1", "2"], action_tokens=[1, 1],
                      rating_tokens=[4, 5], event_count=2).to_feature_row() for u in users]
    feast_direct_writer(store)(rows)
    reader = RedisStateReader(redis_client(cluster_settings), FeastRedisLayout.from_repo(cluster_settings.feature_repo),
                              FEATURE_VIEW)
    views = reader.read_many(users)
    assert [v.user_id for v in views] == users and all(tuple(v.item_ids) == ("1", "2") for v in views)
