"""The tokenize job's counters reach Prometheus through the reporter that infra/flink/config.yaml configures.

The test runs the real job (build_pipeline of jobs/tokenize.py, real Kafka and Schema Registry) on an
in-process Flink mini-cluster whose metrics configuration is the `metrics:` section of infra/flink/config.yaml
(only the port is this test's own), so it checks that configuration without restarting the shared cluster;
the reporter plugin is the one the cluster loads too (<pyflink>/plugins/metrics-prometheus). It then scrapes
/metrics until the TaskManager's ugt counters show every event: tokenized, and dead_lettered per reason.
"""

from __future__ import annotations

import re
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from confluent_kafka import Producer

from infra.settings import REPO_ROOT, get_settings
from streams.producer import EventPublisher
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration]

N_VALID = 40


def flat(prefix: str, tree: Any) -> dict[str, str]:
    """Nested YAML -> Flink's dotted keys."""
    if not isinstance(tree, dict):
        return {prefix: str(tree)}
    out: dict[str, str] = {}
    for key, value in tree.items():
        out.update(flat(f"{prefix}.{key}" if prefix else str(key), value))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(metric name, reason label or '') -> value, for the ugt metrics of the tokenize operator."""
    text = requests.get(f"http://localhost:{port}/metrics", timeout=5).text
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("flink_taskmanager_job_task_operator_ugt_"):
            continue
        match = re.match(r"(\w+)\{(.*)\}\s+(\S+)", line)
        if not match:
            continue
        name, labels, value = match.groups()
        reason = re.search(r'reason="([^"]*)"', labels)
        key = (name, reason.group(1) if reason else "")
        out[key] = out.get(key, 0.0) + float(value)  # summed over parallel subtasks
    return out


def test_tokenize_counters_reach_prometheus(stack: Any, tmp_path: Path) -> None:
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    import jobs.tokenize as tokenize_job
    from jobs.common import config_from_args, flink_configuration

    settings = get_settings()
    run = uuid.uuid4().hex[:8]
    raw = f"itm-{run}.raw"
    ensure_topics(settings, extra=[TopicSpec(raw, 1), TopicSpec(f"itm-{run}.tokens", 1), TopicSpec(f"itm-{run}.dlq", 1)])
    with EventPublisher(settings) as publisher:
        for i in range(N_VALID):
            publisher.publish_user_event({"event_id": f"itm{run}-{i}", "user_id": f"u{i % 4}", "item_id": str(i),
                                          "action": "RATE", "event_time": 978_300_760_000 + i, "rating": 4.0},
                                         topic=raw)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    bad = [b"junk-1", b"junk-2", struct.pack(">bI", 0, 2_000_000_002) + b"\x02"]
    for data in bad:
        producer.produce(raw, data)
    assert producer.flush(30) == 0

    template = yaml.safe_load((REPO_ROOT / "infra" / "flink" / "config.yaml").read_text())
    port = free_port()
    reporter = flat("metrics", template["metrics"])
    assert reporter["metrics.reporter.prom.factory.class"].endswith("PrometheusReporterFactory")
    reporter["metrics.reporter.prom.port"] = str(port)

    parser = tokenize_job.argparse.ArgumentParser()
    tokenize_job.add_arguments(parser)
    args = parser.parse_args(["--local", "--startup", "earliest", "--group-id", f"itm-{run}", "--parallelism", "1",
                              "--source-topic", raw, "--tokens-topic", f"itm-{run}.tokens",
                              "--dlq-topic", f"itm-{run}.dlq", "--no-semantic-ids", "--lake", "",
                              "--checkpoint-interval-ms", "0"])
    cfg = config_from_args(args, "tokenize", **tokenize_job.job_options(args))
    configuration = Configuration()
    for key, value in {**flink_configuration(cfg), **reporter}.items():
        configuration.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(configuration)
    t_env = StreamTableEnvironment.create(env)
    tokenize_job.build_pipeline(env, t_env, cfg)
    client = env.execute_async("tokenize-metrics-test")  # unbounded: the reporter lives as long as the job
    try:
        want = {("flink_taskmanager_job_task_operator_ugt_tokenized", ""): float(N_VALID),
                ("flink_taskmanager_job_task_operator_ugt_processed", ""): float(N_VALID + len(bad)),
                ("flink_taskmanager_job_task_operator_ugt_reason_dead_lettered", "BAD_MAGIC"): 2.0,
                ("flink_taskmanager_job_task_operator_ugt_reason_dead_lettered", "UNKNOWN_SCHEMA"): 1.0}
        deadline = time.monotonic() + 240
        seen: dict[tuple[str, str], float] = {}
        while time.monotonic() < deadline:
            try:
                seen = scrape(port)
            except requests.RequestException:
                seen = {}
            if all(seen.get(k) == v for k, v in want.items()):
                break
            time.sleep(2)
        assert {k: seen.get(k) for k in want} == want, f"scraped from :{port}: {seen}"
    finally:
        client.cancel().result()
