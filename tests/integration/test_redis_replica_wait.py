"""The replica barrier on real redis-servers: a master and its replica, and a 3+3 Redis Cluster, on private ports.

Acknowledged by an attached replica: the flush passes, and the replica holds every write made before it. A replica
that is attached but frozen (SIGSTOP) does not acknowledge: the barrier raises, which fails user_state's flush and
checkpoint. With no replica attached there is nothing to wait for: it passes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from user_state_exactly_once_cluster import free_port

from jobs.replica_wait import ReplicaBarrier, ReplicaWaitError, connected_replicas

pytestmark = pytest.mark.integration


def start_server(folder: Path, *extra: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(folder), *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=2)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            return server, port
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[redis.Redis, redis.Redis, subprocess.Popen]]:
    master, master_port = start_server(tmp_path / "master")
    replica, replica_port = start_server(tmp_path / "replica", "--replicaof", "127.0.0.1", "0")
    replica_client = redis.Redis(port=replica_port, socket_timeout=5)
    replica_client.replicaof("127.0.0.1", master_port)
    master_client = redis.Redis(port=master_port, socket_timeout=5)
    deadline = time.monotonic() + 30
    while connected_replicas(master_client.info("replication")) < 1 or \
            replica_client.info("replication")["master_link_status"] != "up":
        assert time.monotonic() < deadline, "the replica did not attach"
        time.sleep(0.1)
    try:
        yield master_client, replica_client, replica
    finally:
        for server in (replica, master):
            os.kill(server.pid, signal.SIGCONT)
            server.terminate()
            server.wait(timeout=30)


def test_a_flush_passes_once_the_replica_holds_it(pair):
    master, replica, _ = pair
    barrier = ReplicaBarrier(master, replicas=1, timeout_ms=2000)
    writer = redis.Redis(connection_pool=redis.ConnectionPool(port=master.connection_pool.connection_kwargs["port"]))
    writer.set("ugt:test:row", "v1")  # written on another connection, as Feast's pipeline is
    barrier()
    assert replica.get("ugt:test:row") == b"v1"  # no sleep: WAIT returned only after the replica had it


def test_a_frozen_replica_fails_the_flush(pair):
    master, _, replica_server = pair
    barrier = ReplicaBarrier(master, replicas=1, timeout_ms=300)
    os.kill(replica_server.pid, signal.SIGSTOP)  # attached, but acknowledges nothing
    try:
        master.set("ugt:test:row", "v2")
        with pytest.raises(ReplicaWaitError, match="0 of 1 replicas"):
            barrier()
    finally:
        os.kill(replica_server.pid, signal.SIGCONT)


def test_no_replica_attached_nothing_to_wait_for(pair):
    master, replica, _ = pair
    replica.replicaof("no", "one")
    deadline = time.monotonic() + 30
    while connected_replicas(master.info("replication")) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ReplicaBarrier(master, replicas=1, timeout_ms=300)()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[int]]:
    """3 masters + 3 replicas on private ports (what the cluster profile runs), formed by redis-cli."""
    servers, ports = [], []
    try:
        for i in range(6):
            port = free_port()
            bus = free_port()
            server, _ = start_server(tmp_path / f"node{i}", "--cluster-enabled", "yes", "--cluster-port", str(bus),
                                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
                                     port=port)
            servers.append(server)
            ports.append(port)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 90  # the replicas' first sync waits repl-diskless-sync-delay (5 s)
        while not all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in ports) or \
                sum(connected_replicas(redis.Redis(port=p).info("replication")) for p in ports) < 3:
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.2)
        yield ports
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def test_every_master_of_a_redis_cluster_waits_for_its_replica(redis_cluster):
    from redis.cluster import ClusterNode, RedisCluster

    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in redis_cluster])
    keys = [f"ugt:test:{i}" for i in range(200)]  # spread over all three masters
    for key in keys:
        client.set(key, key)
    barrier = ReplicaBarrier(client, replicas=1, timeout_ms=2000)
    barrier()
    assert len(barrier.keys) == 3  # one barrier key per master, each in a slot that master serves
    for name, key in barrier.keys.items():
        assert client.get_node_from_key(key).name == name
    for node in client.get_replicas():  # no sleep: each replica holds every write of its master already
        replica = redis.Redis(host=node.host, port=node.port, single_connection_client=True)
        master_port = int(replica.info("replication")["master_port"])
        held = [k for k in keys if client.get_node_from_key(k).port == master_port]
        assert held
        replica.execute_command("READONLY")  # this connection may read the replica's slots
        assert [replica.get(k) for k in held] == [k.encode() for k in held]
        replica.close()
    client.close()
