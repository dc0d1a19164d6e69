"""The cluster profile of the local stack (`ugt stack up --profile cluster`): replicated engines on one box.

* Kafka: `kafka_brokers` (3) KRaft nodes, each broker AND controller, so the controllers form a 3-voter quorum;
  brokers on kafka_port.., controllers on kafka_cluster_controller_port.. (Settings); internal topics and the
  pipeline's topics at replication factor 3 with min.insync.replicas=2 (streams/topics.py follows
  Settings.topic_replication): one broker may die without losing an acknowledged (acks=all) record.
* Redis Cluster: `redis_masters` (3) masters + one replica each on redis_cluster_port.. (6 nodes), AOF
  `everysec` (infra/redis_conf.py), formed once by `redis-cli --cluster create --cluster-replicas 1`; a restart
  finds the cluster again in each node's nodes.conf.
* Flink: the same standalone cluster with Settings.flink_taskmanagers (3 in this profile) and the jobs at
  Settings.job_parallelism (2).

The single-node profile (infra/stack.py) stays the default; both keep their data apart under var/.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from string import Template

from infra.jars import lib_dir
from infra.processes import java, port_open, spawn
from infra.redis_conf import redis_server_args
from infra.settings import REPO_ROOT, Settings
from infra.stack_errors import StackError
from infra.stack_service import Service

KAFKA_TEMPLATES = REPO_ROOT / "infra" / "kafka"


# ---------------------------------------------------------------------------------------------
# Kafka
# ---------------------------------------------------------------------------------------------
def kafka_jvm(s: Settings, log_dir: Path) -> list[str]:
    """The java command line (without the main class) every Kafka node and the storage tool run with."""
    cp = f"{lib_dir(s) / 'kafka'}/*"
    return [java(), "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dkafka.logs.dir={log_dir}",
            f"-Dlog4j2.configurationFile={KAFKA_TEMPLATES / 'log4j2.properties'}", "-cp", cp]


def format_kafka_storage(jvm: list[str], cluster_id: str, props: Path, data_dir: Path) -> None:
    """`kafka-storage format` once per node (a formatted data folder has meta.properties)."""
    if (data_dir / "meta.properties").exists():
        return
    fmt = subprocess.run([*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props),
                          "--ignore-formatted"], capture_output=True, text=True)
    if fmt.returncode != 0:
        raise StackError(f"kafka storage format failed for {props}:\n{fmt.stdout}{fmt.stderr}")


def broker_dir(s: Settings, node: int) -> Path:
    return s.var_dir / "kafka" / f"broker-{node}"


def kafka_broker_properties(s: Settings, node: int) -> dict[str, str]:
    """server.properties of cluster node `node` (1-based): the single-node template, then the overrides."""
    port, controller = s.kafka_broker_ports[node - 1], s.kafka_controller_ports[node - 1]
    text = Template((KAFKA_TEMPLATES / "server.properties").read_text()).substitute(
        kafka_port=port, controller_port=controller, data_dir=broker_dir(s, node) / "data")
    props = dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    replication, min_isr = str(s.topic_replication), str(max(1, s.topic_replication - 1))
    voters = ",".join(f"{i}@localhost:{p}" for i, p in enumerate(s.kafka_controller_ports, 1))
    props.update({
        "node.id": str(node), "controller.quorum.voters": voters,
        "default.replication.factor": replication, "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replication,
        "transaction.state.log.replication.factor": replication, "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replication,
        "share.coordinator.state.topic.min.isr": min_isr,
        "unclean.leader.election.enable": "false",  # an out-of-sync replica never becomes leader: no lost records
    })
    return props


def write_kafka_cluster_conf(s: Settings) -> list[Path]:
    """var/kafka/broker-<n>/server.properties for every node of the cluster profile."""
    paths = []
    for node in range(1, len(s.kafka_broker_ports) + 1):
        folder = broker_dir(s, node)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "server.properties"
        path.write_text("# rendered by infra/stack_cluster.py (cluster profile)\n"
                        + "".join(f"{k}={v}\n" for k, v in kafka_broker_properties(s, node).items()))
        paths.append(path)
    return paths


def start_kafka_node(s: Settings, node: int) -> int:
    """Spawn cluster node `node` (1-based) from its rendered, formatted folder; its pid. The drills restart one
    node this way (`ugt stack up` waits for a service whose processes run, so it does not restart one node)."""
    log_dir = s.log_dir / "kafka"
    jvm = [a.replace(f"-Dkafka.logs.dir={log_dir}", f"-Dkafka.logs.dir={log_dir / f'broker-{node}'}")
           for a in kafka_jvm(s, log_dir)]
    props = broker_dir(s, node) / "server.properties"
    return spawn([*jvm, "kafka.Kafka", str(props)], log_dir / f"broker-{node}.out")


def kafka_cluster_service(s: Settings, new_cluster_id) -> Service:
    log_dir = s.log_dir / "kafka"

    def healthy() -> bool:
        from confluent_kafka.admin import AdminClient

        try:
            metadata = AdminClient({"bootstrap.servers": s.kafka_bootstrap}).list_topics(timeout=2)
            return len(metadata.brokers) >= len(s.kafka_broker_ports)
        except Exception:
            return False

    def start() -> list[int]:
        log_dir.mkdir(parents=True, exist_ok=True)
        cluster_file = s.var_dir / "kafka" / "cluster-profile.id"
        cluster_file.parent.mkdir(parents=True, exist_ok=True)
        if not cluster_file.exists():
            cluster_file.write_text(new_cluster_id() + "\n")
        jvm = kafka_jvm(s, log_dir)
        for node, props in enumerate(write_kafka_cluster_conf(s), 1):
            format_kafka_storage(jvm, cluster_file.read_text().strip(), props, broker_dir(s, node) / "data")
        return [start_kafka_node(s, node) for node in range(1, len(s.kafka_broker_ports) + 1)]

    return Service("kafka", s.kafka_broker_ports[0], lambda: log_dir / "broker-1" / "server.log", healthy, start)


# ---------------------------------------------------------------------------------------------
# Redis Cluster
# ---------------------------------------------------------------------------------------------
def redis_node_dir(s: Settings, port: int) -> Path:
    return s.var_dir / "redis" / f"cluster-{port}"


def redis_cluster_commands(s: Settings) -> list[list[str]]:
    """One redis-server command line per node (masters first: `--cluster create` makes the first N masters)."""
    return [redis_server_args(port, redis_node_dir(s, port), s.log_dir / "redis" / f"node-{port}.log",
                              s.redis_appendfsync, cluster=True, bus_port=bus)
            for port, bus in zip(s.redis_cluster_ports, s.redis_cluster_bus_ports, strict=True)]


def redis_cluster_create_command(s: Settings) -> list[str]:
    nodes = [f"127.0.0.1:{port}" for port in s.redis_cluster_ports]
    return ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"]


def _cluster_info(port: int) -> dict[str, str]:
    import redis

    try:
        info = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1,
                           decode_responses=True).cluster("INFO")  # redis-py parses it into a dict
    except redis.RedisError:
        return {}
    return {str(k): str(v) for k, v in info.items()}


def _replication_up(port: int) -> bool:
    """A master with a replica attached, or a replica whose link to its master is up (clients then see it)."""
    import redis

    try:
        info = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).info("replication")
    except redis.RedisError:
        return False
    if info.get("role") == "master":
        return int(info.get("connected_slaves", 0)) >= 1
    return info.get("master_link_status") == "up"


def _slots_replicated(port: int) -> bool:
    """In this node's CLUSTER SLOTS every slot range names a replica beside its master (a client that starts from
    this node discovers every node: a replica is gossiped to the other nodes a moment after it attaches)."""
    import redis

    try:
        ranges = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).execute_command("CLUSTER SLOTS")
    except redis.RedisError:
        return False
    if isinstance(ranges, dict):  # redis-py's parsed form: {(start, end): {"primary": ..., "replicas": [...]}}
        return bool(ranges) and all(entry.get("replicas") for entry in ranges.values())
    return bool(ranges) and all(len(entry) >= 4 for entry in ranges)  # [start, end, master, replica, ...]


def redis_cluster_healthy(s: Settings) -> bool:
    """Every slot served, every node known and every master's replica attached and known, as each node sees it."""
    want = str(len(s.redis_cluster_ports))
    for port in s.redis_cluster_ports:
        info = _cluster_info(port)
        if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != want:
            return False
    return (all(_replication_up(port) for port in s.redis_cluster_ports)
            and all(_slots_replicated(port) for port in s.redis_cluster_ports))


def _form_cluster(s: Settings, timeout_s: float = 30.0) -> None:
    """`redis-cli --cluster create` when no node has joined the others yet (a restart re-forms by itself)."""
    deadline = time.monotonic() + timeout_s
    while any(not _cluster_info(port) for port in s.redis_cluster_ports):
        if time.monotonic() > deadline:
            raise StackError(f"Redis cluster nodes {s.redis_cluster_ports} did not answer within {timeout_s:.0f} s; "
                             f"see {s.log_dir / 'redis'}")
        time.sleep(0.2)
    if any(_cluster_info(port).get("cluster_known_nodes") != "1" for port in s.redis_cluster_ports):
        return  # formed before (nodes.conf): the nodes meet again by themselves
    made = subprocess.run(redis_cluster_create_command(s), capture_output=True, text=True, timeout=120)
    if made.returncode != 0:
        raise StackError(f"redis-cli --cluster create failed:\n{made.stdout[-2000:]}{made.stderr[-2000:]}")


def redis_cluster_service(s: Settings) -> Service:
    log_dir = s.log_dir / "redis"

    def start() -> list[int]:
        log_dir.mkdir(parents=True, exist_ok=True)
        taken = [p for p in (*s.redis_cluster_ports, *s.redis_cluster_bus_ports) if port_open(p)]
        if taken:
            raise StackError(f"Redis Cluster port(s) {taken} are taken: free them or move the nodes with "
                             "UGT_REDIS_CLUSTER_PORT / UGT_REDIS_CLUSTER_BUS_OFFSET")
        pids = []
        for port, cmd in zip(s.redis_cluster_ports, redis_cluster_commands(s), strict=True):
            redis_node_dir(s, port).mkdir(parents=True, exist_ok=True)
            pids.append(spawn(cmd, log_dir / f"node-{port}.out"))
        _form_cluster(s)
        return pids

    return Service("redis", s.redis_cluster_ports[0], lambda: log_dir / f"node-{s.redis_cluster_ports[0]}.log",
                   lambda: redis_cluster_healthy(s), start)
