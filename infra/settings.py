"""Where every part of the local stack lives: ports, folders, topic names.

One place, read from environment variables with defaults, so the stack scripts, the jobs,
the CLI, serving and the tests agree. Override any value with its ``UGT_*`` variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    # var/: logs, Kafka/Redis data, Flink checkpoints of the local stack (ignored by git)
    var_dir: Path = field(default_factory=lambda: Path(_env("UGT_VAR", str(REPO_ROOT / "var"))))
    # cache: downloads that survive a fresh clone (Maven jars, datasets)
    cache_dir: Path = field(default_factory=lambda: Path(_env("UGT_CACHE", str(Path.home() / ".cache" / "ugt"))))
    topics: Topics = field(default_factory=Topics)

    @property
    def kafka_bootstrap(self) -> str:
        return _env("UGT_KAFKA_BOOTSTRAP", f"localhost:{self.kafka_port}")

    @property
    def registry_url(self) -> str:
        """Confluent-compatible Schema Registry base URL."""
        return _env("UGT_REGISTRY_URL", f"http://localhost:{self.registry_port}/apis/ccompat/v7")

    @property
    def redis_url(self) -> str:
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
