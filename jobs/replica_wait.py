"""After a user_state flush, WAIT until each Redis master's replicas hold it (the cluster profile, issue #20).

Redis replication is asynchronous: a master answers a write before its replica has it, and a failover promotes the
replica, losing what it had not received. A user_state checkpoint must not complete over writes that only the
dying master held, so with ``--redis-wait-replicas N`` each flush ends with, on every master:

    INFO replication; SET <barrier key in a slot of that master>; WAIT N <timeout>   (one pipeline, one connection)

WAIT waits for the replication offset of the connection's last write. The barrier key's SET makes that the
master's current offset, which covers every earlier write to that master from any connection (Feast's pipeline,
the popularity script). A master answers how many replicas acknowledged; fewer than min(N, replicas online)
raises :class:`ReplicaWaitError`, which fails the flush and so the bundle, the checkpoint and the task (the
restore replays the writes). A master with no replica attached (its replica died, or was just promoted and its old
master has not come back yet, or is still in its first sync) is not waited for: there is no copy to lose the write to, and its AOF keeps what it
acknowledged across a kill -9 (docs/STACK.md, "Redis durability"). Redis 7.0 has no WAITAOF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BARRIER_PREFIX = "ugt:replica-barrier:"
BARRIER_TTL_MS = 600_000


class ReplicaWaitError(RuntimeError):
    """A master's replicas did not acknowledge a flush within the timeout."""


def barrier_keys(primaries: Iterable[str], owner_of: Callable[[str], str], limit: int = 100_000) -> dict[str, str]:
    """One key per primary (by name) whose slot that primary serves: ``ugt:replica-barrier:{<n>}``."""
    wanted = set(primaries)
    keys: dict[str, str] = {}
    for n in range(limit):
        if len(keys) == len(wanted):
            return keys
        key = f"{BARRIER_PREFIX}{{{n}}}"
        owner = owner_of(key)
        if owner in wanted and owner not in keys:
            keys[owner] = key
    raise ReplicaWaitError(f"no barrier key found for the masters {sorted(wanted - set(keys))} in {limit} tries")


def connected_replicas(info: dict[str, Any]) -> int:
    """Replicas of an INFO replication answer that are online (a replica still in its first sync, e.g. waiting for
    the master's RDB, acknowledges nothing until it is; the RDB plus the stream after it then hold every write)."""
    return sum(1 for key, value in info.items()
               if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")


def check_acks(node: str, required: int, attached: int, acked: int, timeout_ms: int) -> None:
    """Raise unless `acked` covers min(required, attached) replicas."""
    needed = min(required, attached)
    if acked < needed:
        raise ReplicaWaitError(f"Redis master {node}: {acked} of {needed} replicas acknowledged the flush within "
                               f"{timeout_ms} ms (WAIT {required} {timeout_ms}); failing so the checkpoint does not "
                               "cover writes only the master holds")


class ReplicaBarrier:
    """Callable run after each flush: every master of `client` (a RedisCluster or one redis.Redis) WAITs."""

    def __init__(self, client: Any, replicas: int, timeout_ms: int = 1000):
        if replicas < 1 or timeout_ms < 1:
            raise ValueError(f"replicas and timeout_ms must be >= 1, got {replicas}, {timeout_ms}")
        self.client = client
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.keys: dict[str, str] = {}
        self.waits = 0

    def _masters(self) -> list[tuple[str, Any]]:
        """(name, plain client of that master); barrier keys recomputed when the set of masters changed."""
        client = self.client
        if not hasattr(client, "get_primaries"):  # one node
            if not self.keys:
                self.keys = {"node": f"{BARRIER_PREFIX}{{0}}"}
            return [("node", client)]
        nodes = {node.name: node for node in client.get_primaries()}
        if set(nodes) != set(self.keys):
            self.keys = barrier_keys(nodes, lambda key: client.get_node_from_key(key).name)
        return [(name, client.get_redis_connection(node)) for name, node in nodes.items()]

    def __call__(self) -> None:
        for name, node_client in self._masters():
            pipe = node_client.pipeline(transaction=False)
            pipe.info("replication")
            pipe.set(self.keys[name], self.waits, px=BARRIER_TTL_MS)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            info, _, acked = pipe.execute()
            check_acks(name, self.replicas, connected_replicas(info), int(acked), self.timeout_ms)
        self.waits += 1
