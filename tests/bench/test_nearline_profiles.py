"""bench.nearline --stack-profiles: the cluster profile's settings and CPU scope, and two runs in one result (no stack)."""

from __future__ import annotations

import os

import pytest

from bench import nearline
from bench.nearline_paths import stack_scope


def run_result(flink: float, outside: float, events_per_s: float) -> dict:
    budget = {"flink_us_per_event": flink, "outside_flink_us_per_event": outside,
              "us_per_event_by_process": {"flink-taskmanager": flink, "redis": outside}}
    return {"events_per_s": events_per_s, "flink_cpu_us_per_event_exactly_once": flink * 2,
            "cpu_during_throughput": {"budget": budget}}


def test_two_profiles_make_one_result_with_cpu_per_event_side_by_side() -> None:
    single, cluster = run_result(30.0, 10.0, 5000.0), run_result(45.0, 25.5, 2000.0)
    result, conditions = nearline.combine({"single": (single, {"events": 9, "stack": "s"}),
                                           "cluster": (cluster, {"events": 9, "stack": "c"})})
    assert result["events_per_s"] == 5000.0 and result["stack_profile"] == "single"  # a single run's readers keep working
    assert result["stack_profiles"] == {"single": single, "cluster": cluster}
    by_profile = result["cpu_per_event_by_stack_profile"]
    assert by_profile["single"]["total_us_per_event"] == 40.0
    assert by_profile["cluster"]["total_us_per_event"] == 70.5
    assert by_profile["cluster"]["us_per_event_by_process"] == {"flink-taskmanager": 45.0, "redis": 25.5}
    assert by_profile["cluster"]["flink_us_per_event_exactly_once"] == 90.0
    assert conditions["stack_profiles"]["cluster"]["stack"] == "c"


def test_a_run_without_cpu_has_no_cpu_per_event() -> None:
    row = nearline.cpu_per_event({"events_per_s": None, "flink_cpu_us_per_event_exactly_once": None,
                                  "cpu_during_throughput": None})
    assert (row["flink_us_per_event"], row["total_us_per_event"]) == (None, None)


def test_the_cluster_profile_runs_on_its_own_ports_and_its_scope_names_every_redis_node(monkeypatch) -> None:
    monkeypatch.setenv("UGT_REDIS_PORT", "36380")
    monkeypatch.setenv("UGT_VAR", "/tmp/ugt-test-var")
    monkeypatch.delenv("UGT_PROFILE", raising=False)
    stopped = []
    monkeypatch.setattr("infra.stack.down", lambda settings, log: stopped.append(settings.var_dir))
    with nearline.profile_stack("cluster", 200) as settings:
        assert settings.cluster and settings.redis_port == 36580
        assert os.environ["UGT_PROFILE"] == "cluster"
        scope = stack_scope(settings)
        assert scope[0].endswith("nearline-cluster")
        assert [f":{p}" for p in settings.redis_cluster_ports] == list(scope[1:]) and len(scope) == 7
        label = nearline.profile_label(settings)
        assert (label["kafka_brokers"], label["topic_replication"]) == (3, 3)
    assert "UGT_PROFILE" not in os.environ and os.environ["UGT_REDIS_PORT"] == "36380"  # restored
    assert [str(p) for p in stopped] == ["/tmp/ugt-test-var/nearline-cluster"]


def test_the_single_profile_refuses_a_cluster_stack(monkeypatch) -> None:
    monkeypatch.setenv("UGT_PROFILE", "cluster")
    with pytest.raises(SystemExit, match="single-node profile"), nearline.profile_stack("single", 200):
        pass


def test_unknown_or_repeated_profiles_are_refused() -> None:
    for bad in ("single,edge", "cluster,cluster"):
        with pytest.raises(SystemExit, match="--stack-profiles"):
            nearline.main(["--stack-profiles", bad])


def test_the_single_profile_scope_is_its_var_folder_and_its_redis_port(monkeypatch) -> None:
    from infra.settings import Settings

    monkeypatch.setenv("UGT_PROFILE", "single")
    monkeypatch.setenv("UGT_REDIS_PORT", "36380")
    monkeypatch.setenv("UGT_VAR", "/tmp/ugt-test-var")
    assert stack_scope(Settings()) == ("/tmp/ugt-test-var", ":36380")
