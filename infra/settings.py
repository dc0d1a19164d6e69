"""Where every part of the local stack lives: ports, folders, topic names.

One place, read from environment variables with defaults, so the stack scripts, the jobs,
the CLI, serving and the tests agree. Override any value with its ``UGT_*`` variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("single", "cluster")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Topics:
    """Kafka topic names (`<domain>.<stage>`, lower case, dots as separators)."""

    raw: str = "events.raw"
    items: str = "items.catalog"
    tokens: str = "events.tokens"
    dlq: str = "events.dlq"
    impressions: str = "events.impressions"  # the lists /recommend served (schemas/impression.avsc)
    experiment_metrics: str = "experiments.metrics"  # feedback_join: JSON metrics per (experiment, arm, window)


@dataclass(frozen=True)
class Settings:
    """Read when constructed (not at import), so UGT_* variables set later still count."""

    kafka_port: int = field(default_factory=lambda: int(_env("UGT_KAFKA_PORT", "9092")))
    kafka_controller_port: int = field(default_factory=lambda: int(_env("UGT_KAFKA_CONTROLLER_PORT", "9093")))
    registry_port: int = field(default_factory=lambda: int(_env("UGT_REGISTRY_PORT", "8085")))
    redis_port: int = field(default_factory=lambda: int(_env("UGT_REDIS_PORT", "6379")))
    flink_rest_port: int = field(default_factory=lambda: int(_env("UGT_FLINK_PORT", "8081")))
    flink_rpc_port: int = field(default_factory=lambda: int(_env("UGT_FLINK_RPC_PORT", "6123")))  # JobManager RPC (TaskManagers dial it)
    serving_port: int = field(default_factory=lambda: int(_env("UGT_SERVING_PORT", "8000")))
    # Flink's Prometheus reporter: the JobManager and each TaskManager take the first free port of
    # flink_metrics_ports (infra/flink/config.yaml), so scrapers look at the whole range
    flink_metrics_port: int = field(default_factory=lambda: int(_env("UGT_FLINK_METRICS_PORT", "9249")))
    # TaskManagers of the local cluster (2 slots each, slots spread evenly): in thread mode each TaskManager
    # embeds one CPython, so one JVM per job keeps tokenize and user_state off each other's GIL (docs/JOBS.md)
    flink_taskmanagers: int = field(default_factory=lambda: int(_env("UGT_FLINK_TASKMANAGERS", "2")))
    # "single" (the default: one broker, one Redis) or "cluster" (3 Kafka brokers + a 3-voter KRaft quorum, a Redis
    # Cluster of 3 masters + 3 replicas, 3 TaskManagers; infra/stack_cluster.py, docs/STACK.md)
    # (UGT_PROFILE, else the profile `ugt stack up --profile` recorded in var/run/profile, else single)
    profile: str = field(default_factory=lambda: _env("UGT_PROFILE", ""))
    # the cluster profile's ports: brokers kafka_port.., controllers kafka_cluster_controller_port..,
    # Redis nodes redis_cluster_port.. (each a run of consecutive ports)
    kafka_cluster_controller_port: int = field(
        default_factory=lambda: int(_env("UGT_KAFKA_CLUSTER_CONTROLLER_PORT", "0")))
    redis_cluster_port: int = field(default_factory=lambda: int(_env("UGT_REDIS_CLUSTER_PORT", "0")))
    kafka_brokers: int = 3  # brokers of the cluster profile (each also a controller: a 3-voter quorum)
    redis_masters: int = 3  # masters of the cluster profile's Redis Cluster, one replica each
    # parallelism of the jobs `ugt jobs submit` starts: 1 on the single node, 2 in the cluster profile
    job_parallelism: int = field(default_factory=lambda: int(_env("UGT_JOB_PARALLELISM", "0")))
    # var/: logs, Kafka/Redis data, Flink checkpoints of the local stack (ignored by git)
    var_dir: Path = field(default_factory=lambda: Path(_env("UGT_VAR", str(REPO_ROOT / "var"))))
    # cache: downloads that survive a fresh clone (Maven jars, datasets)
    cache_dir: Path = field(default_factory=lambda: Path(_env("UGT_CACHE", str(Path.home() / ".cache" / "ugt"))))
    topics: Topics = field(default_factory=Topics)

    def __post_init__(self) -> None:
        if not self.profile:
            recorded = self.var_dir / "run" / "profile"
            object.__setattr__(self, "profile", recorded.read_text().strip() if recorded.is_file() else "single")
        if self.profile not in PROFILES:
            raise ValueError(f"UGT_PROFILE must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.kafka_cluster_controller_port == 0:  # next to the single node's controller port
            object.__setattr__(self, "kafka_cluster_controller_port", self.kafka_controller_port + 100)
        if self.redis_cluster_port == 0:
            object.__setattr__(self, "redis_cluster_port", self.redis_port + 1)
        if self.profile == "cluster" and "UGT_FLINK_TASKMANAGERS" not in os.environ:
            object.__setattr__(self, "flink_taskmanagers", 3)
        if self.job_parallelism == 0:
            object.__setattr__(self, "job_parallelism", 2 if self.profile == "cluster" else 1)

    @property
    def cluster(self) -> bool:
        return self.profile == "cluster"

    @property
    def kafka_broker_ports(self) -> list[int]:
        """Client ports of the brokers: one in the single profile, kafka_brokers in the cluster profile."""
        return [self.kafka_port + i for i in range(self.kafka_brokers if self.cluster else 1)]

    @property
    def kafka_controller_ports(self) -> list[int]:
        if not self.cluster:
            return [self.kafka_controller_port]
        return [self.kafka_cluster_controller_port + i for i in range(self.kafka_brokers)]

    @property
    def redis_cluster_ports(self) -> list[int]:
        """The Redis Cluster's nodes (masters first, then their replicas) in the cluster profile."""
        return [self.redis_cluster_port + i for i in range(2 * self.redis_masters)]

    @property
    def redis_cluster_bus_ports(self) -> list[int]:
        """Each node's cluster bus port: its port + 100 (UGT_REDIS_CLUSTER_BUS_OFFSET), not Redis's +10000, which
        lands in the kernel's ephemeral port range for the high ports test stacks use."""
        offset = int(_env("UGT_REDIS_CLUSTER_BUS_OFFSET", "100"))
        return [port + offset for port in self.redis_cluster_ports]

    @property
    def topic_replication(self) -> int:
        """Replication factor of the pipeline's topics: 1 on one broker, 3 in the cluster profile."""
        return min(3, len(self.kafka_broker_ports))

    @property
    def redis_appendfsync(self) -> str:
        """AOF fsync policy (infra/redis_conf.py): `always` on the single node, `everysec` + replicas in the cluster."""
        return _env("UGT_REDIS_APPENDFSYNC", "everysec" if self.cluster else "always")

    @property
    def kafka_bootstrap(self) -> str:
        default = ",".join(f"localhost:{port}" for port in self.kafka_broker_ports)
        return _env("UGT_KAFKA_BOOTSTRAP", default)

    @property
    def registry_url(self) -> str:
        """Confluent-compatible Schema Registry base URL."""
        return _env("UGT_REGISTRY_URL", f"http://localhost:{self.registry_port}/apis/ccompat/v7")

    @property
    def redis_url(self) -> str:
        """One node's URL, or in the cluster profile the nodes as `redis+cluster://host:port,host:port,...`
        (infra/redis_client.py opens either)."""
        if self.cluster:
            nodes = ",".join(f"localhost:{port}" for port in self.redis_cluster_ports)
            return _env("UGT_REDIS_URL", f"redis+cluster://{nodes}")
        return _env("UGT_REDIS_URL", f"redis://localhost:{self.redis_port}/0")

    @property
    def flink_rest_url(self) -> str:
        return _env("UGT_FLINK_REST", f"http://localhost:{self.flink_rest_port}")

    @property
    def flink_metrics_ports(self) -> range:
        """Ports of the Prometheus endpoints of the Flink processes (JobManager + the TaskManagers + 2 spare)."""
        return range(self.flink_metrics_port, self.flink_metrics_port + max(4, self.flink_taskmanagers + 3))

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    @property
    def feature_repo(self) -> Path:
        return Path(_env("UGT_FEATURE_REPO", str(REPO_ROOT / "feature_repo")))


def get_settings() -> Settings:
    return Settings()
