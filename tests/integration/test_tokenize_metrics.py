"""The tokenize job's counters reach Prometheus through the reporter that infra/flink/config.yaml configures.

The real job (jobs/tokenize_job.py's build_pipeline, real Kafka and Schema Registry) runs in its own process on an
in-process Flink mini-cluster whose metrics options are the `metrics:` section of infra/flink/config.yaml (only
the port is this test's), with the reporter jar the cluster loads as a plugin (<pyflink>/plugins/
metrics-prometheus) on its classpath; so the configuration is checked without restarting the shared cluster. The test scrapes /metrics until the
TaskManager's ugt counters show every event: processed, tokenized, and dead_lettered per reason.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from confluent_kafka import Producer

from infra.settings import REPO_ROOT, get_settings
from streams.producer import EventPublisher
from streams.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration]

N_VALID = 40
PREFIX = "flink_taskmanager_job_task_operator_ugt_"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(metric name, reason label or '') -> value, summed over subtasks, for the ugt metrics."""
    text = requests.get(f"http://localhost:{port}/metrics", timeout=5).text
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = re.match(r"(\w+)\{(.*)\}\s+(\S+)", line)
        if not match or not match.group(1).startswith(PREFIX):
            continue
        name, labels, value = match.groups()
        reason = re.search(r'reason="([^"]*)"', labels)
        key = (name[len(PREFIX):], reason.group(1) if reason else "")
        out[key] = out.get(key, 0.0) + float(value)
    return out


@pytest.mark.parametrize("engine", ["python", "sql"])
def test_tokenize_counters_reach_prometheus(stack: Any, tmp_path: Path, engine: str) -> None:
    """engine sql: the same counters, registered by the JVM table function on its operator's group."""
    import pyflink

    settings = get_settings()
    run = uuid.uuid4().hex[:8]
    raw, tokens, dlq = f"itm-{run}.raw", f"itm-{run}.tokens", f"itm-{run}.dlq"
    ensure_topics(settings, extra=[TopicSpec(raw, 1), TopicSpec(tokens, 1), TopicSpec(dlq, 1)])
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

    port = free_port()
    # the cluster loads the reporter as a plugin (FLINK_HOME/plugins); the mini-cluster of a local PyFlink job
    # only finds reporter factories on its classpath: a lib/ of the package's jars plus the same plugin jar
    home = Path(pyflink.__file__).parent
    lib = tmp_path / "lib"
    lib.mkdir()
    for jar in [*(home / "lib").glob("*.jar"), *(home / "plugins" / "metrics-prometheus").glob("*.jar")]:
        (lib / jar.name).symlink_to(jar)
    # FLINK_HOME set: PyFlink trusts it and keeps our FLINK_LIB_DIR (else it resets it to the package lib/)
    env = {**os.environ, "FLINK_HOME": str(home), "FLINK_LIB_DIR": str(lib)}
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "integration" / "tokenize_metrics_job.py"), str(port), "--",
         "--startup", "earliest", "--group-id", f"itm-{run}", "--parallelism", "1", "--source-topic", raw,
         "--tokens-topic", tokens, "--dlq-topic", dlq, "--no-semantic-ids", "--lake", "",
         "--checkpoint-interval-ms", "0", "--engine", engine],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    want = {("processed", ""): float(N_VALID + len(bad)), ("tokenized", ""): float(N_VALID),
            ("dead_lettered", ""): float(len(bad)),
            ("reason_dead_lettered", "BAD_MAGIC"): 2.0, ("reason_dead_lettered", "UNKNOWN_SCHEMA"): 1.0}
    seen: dict[tuple[str, str], float] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            try:
                seen = scrape(port)
            except requests.RequestException:
                seen = {}
            if all(seen.get(k) == v for k, v in want.items()):
                break
            time.sleep(2)
    finally:
        try:
            os.killpg(job.pid, signal.SIGTERM)  # the job's own session: its JVM goes with it
            job.wait(30)
        except ProcessLookupError:
            pass  # the job died on its own: the assertion below shows its log
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
        log.close()
    tail = (tmp_path / "job.log").read_text()[-3000:]
    assert {k: seen.get(k) for k in want} == want, f"scraped from :{port}: {seen}\n--- job log ---\n{tail}"
