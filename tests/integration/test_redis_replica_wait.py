"""The replica barrier on real redis-servers: a master and its replica on private ports (issue #20).

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

from jobs.replica_wait import ReplicaBarrier, ReplicaWaitError

pytestmark = pytest.mark.integration


def start_server(folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
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
    while int(master_client.info("replication")["connected_slaves"]) < 1 or \
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
    while int(master.info("replication")["connected_slaves"]) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ReplicaBarrier(master, replicas=1, timeout_ms=300)()
