"""The stack's rendered configuration (no services started): ports and folders follow Settings."""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from infra import stack
from infra.flink_home import flink_bin, flink_env, write_flink_conf
from infra.settings import Settings, get_settings
from infra.stack_errors import StackError


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return replace(get_settings(), var_dir=tmp_path / "var", kafka_port=19092, kafka_controller_port=19093,
                   flink_rest_port=18081, flink_rpc_port=16123)


def test_kafka_properties_follow_settings(settings: Settings) -> None:
    text = stack.write_kafka_conf(settings).read_text()
    props = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert props["listeners"] == "PLAINTEXT://localhost:19092,CONTROLLER://localhost:19093"
    assert props["controller.quorum.voters"] == "1@localhost:19093"
    assert props["log.dirs"] == str(settings.var_dir / "kafka" / "data")
    assert props["process.roles"] == "broker,controller"
    assert "$" not in text


def test_flink_config_follows_settings(settings: Settings) -> None:
    conf = yaml.safe_load((write_flink_conf(settings) / "config.yaml").read_text())
    assert conf["rest"]["port"] == 18081 and conf["jobmanager"]["rpc"]["port"] == 16123
    assert conf["taskmanager"]["numberOfTaskSlots"] == 2
    assert conf["taskmanager"]["load-balance"]["mode"] == "slots"  # one job per TaskManager (GIL) when slots allow
    assert conf["python"]["executable"] == sys.executable
    assert conf["execution"]["checkpointing"]["dir"] == (settings.var_dir / "flink" / "checkpoints").as_uri()
    assert conf["env"]["log"]["dir"] == str(settings.log_dir / "flink")
    assert (settings.var_dir / "flink" / "conf" / "log4j.properties").is_file()


def test_flink_env_points_the_cli_at_this_stack(settings: Settings) -> None:
    env = flink_env(settings)
    assert env["FLINK_CONF_DIR"] == str(settings.var_dir / "flink" / "conf")
    assert "--add-opens=java.base/java.util=ALL-UNNAMED" in env["FLINK_ENV_JAVA_OPTS"]
    assert flink_bin().is_file()


def test_cluster_ids_are_kafka_uuids() -> None:
    ids = {stack.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)


def test_unknown_service_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(StackError, match="unknown service"):
        stack.services(settings, ["kafka", "zookeeper"])


def test_redis_runs_the_aof_with_the_profile_fsync(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.redis_conf import redis_server_args

    monkeypatch.delenv("UGT_REDIS_APPENDFSYNC", raising=False)
    args = redis_server_args(settings.redis_port, settings.var_dir, settings.var_dir / "r.log", settings.redis_appendfsync)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"  # single node: fsync before reply
    assert "--cluster-enabled" not in args
    cluster = redis_server_args(26380, settings.var_dir, settings.var_dir / "r.log", "everysec", cluster=True)
    assert cluster[cluster.index("--cluster-enabled") + 1] == "yes"
    with pytest.raises(StackError, match="UGT_REDIS_APPENDFSYNC"):
        redis_server_args(26380, settings.var_dir, settings.var_dir / "r.log", "sometimes")
