"""The redis-server command lines of the local stack: the single node and the nodes of the cluster profile.

Durability. Both profiles run the AOF (`appendonly yes`). user_state confirms a user's Feast row and popularity
once its batch was acknowledged, and a checkpoint taken after that confirmation is never replayed; so whatever
Redis acknowledged must survive a crash of redis-server, or those users stay one write behind for good (issue #20).
``appendfsync`` decides what "survive" covers (docs/STACK.md, "Redis durability"):

* ``always`` (the single-node default): Redis fsyncs the AOF before it answers, once per event-loop iteration,
  so a pipelined batch pays one fsync; an acknowledged write survives a kill -9 AND a power loss;
* ``everysec`` (the cluster profile's, like infra/k8s): the write() reaches the kernel before the reply and an
  fsync follows within ~1 s, so a kill -9 of redis-server loses nothing but a machine crash can lose ~1 s; the
  replicas (asynchronous) are the other copy;
* ``no``: the kernel decides when to flush (tens of seconds).

UGT_REDIS_APPENDFSYNC overrides the profile's choice (Settings.redis_appendfsync).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from infra.stack_errors import StackError

APPENDFSYNC_CHOICES = ("always", "everysec", "no")


def redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise StackError("redis-server not found: run `bash infra/install.sh` (apt-get install redis-server)")
    return exe


def redis_server_args(port: int, data_dir: Path, log: Path, appendfsync: str, cluster: bool = False,
                      bus_port: int = 0) -> list[str]:
    """The redis-server command line of one node (data and AOF in ``data_dir``, which is also its cwd).

    A cluster node also listens on its cluster bus port (``bus_port``; Redis's default port + 10000 would land in
    Linux's ephemeral range 32768-60999 for ports above 22768, where an outgoing connection can hold it).
    """
    if appendfsync not in APPENDFSYNC_CHOICES:
        raise StackError(f"UGT_REDIS_APPENDFSYNC must be one of {', '.join(APPENDFSYNC_CHOICES)}, got {appendfsync!r}")
    args = [redis_server(), "--port", str(port), "--bind", "127.0.0.1", "-::1", "--dir", str(data_dir),
            "--logfile", str(log), "--daemonize", "no", "--protected-mode", "yes",
            # the AOF is the durable copy; an RDB snapshot now and then keeps restarts fast (the AOF's base file)
            "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "3600 1 300 100 60 10000",
            # no eviction: an evicted state row would be lost as surely as a crashed one (keys expire by TTL)
            "--maxmemory-policy", "noeviction"]
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000", "--cluster-announce-ip", "127.0.0.1"]
        if bus_port:
            args += ["--cluster-port", str(bus_port)]
    return args
