"""The cluster profile's rendered configuration (no services started): ports and folders follow Settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import stack, stack_cluster
from infra.settings import Settings
from streams.topics import TopicError, topic_replication

ENV = ("UGT_PROFILE", "UGT_FLINK_TASKMANAGERS", "UGT_JOB_PARALLELISM", "UGT_REDIS_APPENDFSYNC", "UGT_REDIS_URL",
       "UGT_KAFKA_BOOTSTRAP", "UGT_KAFKA_CLUSTER_CONTROLLER_PORT", "UGT_REDIS_CLUSTER_PORT")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UGT_VAR", str(tmp_path / "var"))
    monkeypatch.setenv("UGT_KAFKA_PORT", "29092")
    monkeypatch.setenv("UGT_KAFKA_CONTROLLER_PORT", "29093")
    monkeypatch.setenv("UGT_REDIS_PORT", "26379")
    monkeypatch.setenv("UGT_PROFILE", "cluster")
    return Settings()


def test_cluster_settings_derive_ports_from_the_single_ones(cluster: Settings) -> None:
    assert cluster.kafka_broker_ports == [29092, 29093, 29094]
    assert cluster.kafka_controller_ports == [29193, 29194, 29195]
    assert cluster.redis_cluster_ports == list(range(26380, 26386))
    assert cluster.kafka_bootstrap == "localhost:29092,localhost:29093,localhost:29094"
    assert cluster.redis_url == "redis+cluster://" + ",".join(f"localhost:{p}" for p in range(26380, 26386))
    assert (cluster.flink_taskmanagers, cluster.job_parallelism, cluster.topic_replication) == (3, 2, 3)
    assert cluster.redis_appendfsync == "everysec"


def test_single_profile_is_the_default_and_the_recorded_profile_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UGT_VAR", str(tmp_path))
    single = Settings()
    assert (single.profile, single.topic_replication, single.job_parallelism, single.redis_appendfsync) == \
        ("single", 1, 1, "always")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "profile").write_text("cluster\n")  # what `ugt stack up --profile cluster` records
    assert Settings().cluster
    monkeypatch.setenv("UGT_PROFILE", "single")  # the variable wins
    assert not Settings().cluster
    monkeypatch.setenv("UGT_PROFILE", "cloud")
    with pytest.raises(ValueError, match="UGT_PROFILE"):
        Settings()


def test_kafka_nodes_form_a_three_voter_quorum_with_rf3(cluster: Settings) -> None:
    paths = stack_cluster.write_kafka_cluster_conf(cluster)
    assert [p.parent.name for p in paths] == ["broker-1", "broker-2", "broker-3"]
    props = [dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line and line[0] != "#")
             for p in paths]
    voters = "1@localhost:29193,2@localhost:29194,3@localhost:29195"
    for node, p in enumerate(props, 1):
        assert p["node.id"] == str(node) and p["controller.quorum.voters"] == voters
        assert p["process.roles"] == "broker,controller"
        assert p["listeners"] == f"PLAINTEXT://localhost:{29091 + node},CONTROLLER://localhost:{29192 + node}"
        assert p["log.dirs"] == str(cluster.var_dir / "kafka" / f"broker-{node}" / "data")
        assert p["default.replication.factor"] == "3" and p["min.insync.replicas"] == "2"
        assert p["offsets.topic.replication.factor"] == "3" and p["transaction.state.log.min.isr"] == "2"
        assert p["unclean.leader.election.enable"] == "false"
    assert "$" not in paths[0].read_text()


def test_redis_cluster_nodes_and_create_command(cluster: Settings) -> None:
    commands = stack_cluster.redis_cluster_commands(cluster)
    assert len(commands) == 6
    ports = [int(c[c.index("--port") + 1]) for c in commands]
    assert ports == list(range(26380, 26386))
    for port, c in zip(ports, commands, strict=True):
        assert c[c.index("--cluster-enabled") + 1] == "yes"
        assert c[c.index("--appendonly") + 1] == "yes" and c[c.index("--appendfsync") + 1] == "everysec"
        assert c[c.index("--dir") + 1] == str(cluster.var_dir / "redis" / f"cluster-{port}")
        assert c[c.index("--cluster-port") + 1] == str(port + 100)  # below the ephemeral range, unlike +10000
    create = stack_cluster.redis_cluster_create_command(cluster)
    assert create[:3] == ["redis-cli", "--cluster", "create"] and "127.0.0.1:26385" in create
    assert create[-3:] == ["--cluster-replicas", "1", "--cluster-yes"]


def test_the_cluster_profile_swaps_in_the_replicated_services(cluster: Settings) -> None:
    by_name = {svc.name: svc for svc in stack.services(cluster)}
    assert by_name["kafka"].port == 29092 and by_name["redis"].port == 26380
    assert by_name["flink"].port == cluster.flink_rest_port


def test_topic_replication_follows_the_profile(cluster: Settings) -> None:
    assert topic_replication(cluster, 3) == 3
    with pytest.raises(TopicError, match="replication factor 3, but only 2"):
        topic_replication(cluster, 2)
