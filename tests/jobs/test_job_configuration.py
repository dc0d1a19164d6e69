"""Which jars a job ships and which Flink options it sets: jobs.common.flink_configuration against a fake lib/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.common import CONNECTOR_JAR_NAME, JobConfig, cluster_has_connector, flink_configuration
from jobs.lake import cluster_has_parquet


@pytest.fixture
def lib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cluster lib/ (FLINK_LIB_DIR) holding flink-python, as `ugt stack up` links it."""
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / "flink-python-2.2.1.jar").write_bytes(b"")
    monkeypatch.setenv("FLINK_LIB_DIR", str(folder))
    return folder


def config(connector: Path, local: bool = False) -> JobConfig:
    return JobConfig(job_name="tokenize", bootstrap="b", registry="r", redis="redis://x", group_id="g",
                     local=local, connector_jar=str(connector), python=sys.executable, checkpoint_interval_ms=0)


def test_the_connector_is_shipped_when_the_cluster_lacks_it(lib: Path, tmp_path: Path) -> None:
    connector = tmp_path / CONNECTOR_JAR_NAME
    connector.write_bytes(b"jar")
    assert not cluster_has_connector(str(connector))
    assert flink_configuration(config(connector))["pipeline.jars"] == connector.as_uri()


def test_the_connector_in_the_clusters_lib_is_not_shipped_again(lib: Path, tmp_path: Path) -> None:
    connector = tmp_path / CONNECTOR_JAR_NAME
    connector.write_bytes(b"jar")
    (lib / CONNECTOR_JAR_NAME).symlink_to(connector)
    assert cluster_has_connector(str(connector))
    conf = flink_configuration(config(connector))
    assert "pipeline.jars" not in conf  # loaded once per TaskManager, so its classes stay JIT-compiled
    assert conf["pipeline.object-reuse"] == "true"
    # a local mini-cluster does not read the cluster's lib/: it still ships the jar
    assert flink_configuration(config(connector, local=True))["pipeline.jars"] == connector.as_uri()


def test_a_connector_of_your_own_is_shipped_even_when_the_cluster_has_one(lib: Path, tmp_path: Path) -> None:
    stack_jar, own = tmp_path / "stack" / CONNECTOR_JAR_NAME, tmp_path / "own" / CONNECTOR_JAR_NAME
    for jar in (stack_jar, own):
        jar.parent.mkdir()
        jar.write_bytes(b"jar")
    (lib / CONNECTOR_JAR_NAME).symlink_to(stack_jar)
    assert flink_configuration(config(own))["pipeline.jars"] == own.as_uri()


def test_parquet_jars_in_the_clusters_lib(lib: Path) -> None:
    assert not cluster_has_parquet()
    (lib / "flink-parquet-2.2.0.jar").write_bytes(b"")
    assert cluster_has_parquet()
