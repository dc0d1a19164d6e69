"""`ugt serve` with engine: auto (a process on this CPU box), as users run it: a subprocess, real Redis, state pushed through Feast.

The engine process (forked after torch.compile at start-up) answers the same items and scores as the in-process
eager (thread) service; /metrics adds up both processes' series; killing the engine process gives marked
fallbacks (never a 5xx) and a new engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.proc_cpu import process_tree
from bench.serving import start_server
from infra.settings import Settings
from serving.app import create_app
from serving.config import build_config
from tests.integration.test_serving import Served
from tests.integration.test_serving_ugt import DOMAIN, HISTORY, USER, checkpoint, seeded  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(seeded: Settings, checkpoint: Path, tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, dict]]:  # noqa: F811
    folder = tmp_path_factory.mktemp("engine")
    config = {"generator": "ugt", "checkpoint": str(checkpoint), "default_domain": DOMAIN, "engine": "auto",
              "torch_compile": True, "log_level": "warning"}  # as shipped: the engine inherits the compiled steps
    server = start_server("engine", folder, os.environ | {"PYTHONPATH": str(REPO)}, config, workers=1)
    try:
        yield f"http://127.0.0.1:{server.port}", server.proc, config
    finally:
        server.stop()


def recommend(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/recommend", json={"user_id": USER, **body}, timeout=10)


def engine_pids(proc: subprocess.Popen) -> list[int]:
    return [p.pid for p in process_tree(proc.pid) if p.pid != proc.pid]


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_engine_process_answers_as_the_in_process_service(served, seeded: Settings, tmp_path):  # noqa: F811
    url, proc, config = served
    r = recommend(url, k=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] is False and body["model"].startswith("ugt-ugt-ml100k-tiny-")
    (pid,) = engine_pids(proc)  # one engine beside the HTTP process
    engine = requests.get(f"{url}/health", timeout=10).json()["checks"]["engine"]
    assert engine == {"ok": True, "detail": f"engine process {pid} up, 0 restarts"}

    eager = config | {"engine": "thread", "torch_compile": False}
    in_process = Served(create_app(seeded, build_config(eager, env={}, base_dir=tmp_path)))
    try:
        same = in_process.post({"user_id": USER, "k": 10}).json()
    finally:
        in_process.stop()
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in same["items"]]
    assert [i["score"] for i in body["items"]] == pytest.approx([i["score"] for i in same["items"]], abs=1e-4)
    assert not {i["item_id"] for i in body["items"]} & set(HISTORY)


def test_metrics_add_up_the_http_and_engine_processes(served):
    url, _, _ = served
    before = samples(url)
    for _ in range(5):
        assert recommend(url, k=5).status_code == 200
    after = samples(url)
    total = ("ugt_serving_stage_seconds_count", (("stage", "total"),))  # observed in the engine process
    requests_ok = ("ugt_serving_requests_total", (("endpoint", "/recommend"), ("status", "200")))  # HTTP process
    assert after[total] - before.get(total, 0.0) == 5
    assert after[requests_ok] - before.get(requests_ok, 0.0) == 5
    hits = ("ugt_serving_kv_cache_lookups_total", (("domain", DOMAIN), ("result", "hit")))
    assert after[hits] - before.get(hits, 0.0) == 5  # the same user again: the engine's KV cache is read


def test_a_killed_engine_gives_marked_fallbacks_then_a_new_engine(served):
    url, proc, _ = served
    expected = [i["item_id"] for i in recommend(url, k=10).json()["items"]]
    (victim,) = engine_pids(proc)
    os.kill(victim, signal.SIGKILL)
    statuses, reasons = [], []
    deadline = time.monotonic() + 30
    while True:
        r = recommend(url, k=10)
        statuses.append(r.status_code)
        body = r.json()
        if not body["fallback"]:
            break
        reasons.append(body["fallback_reason"])
        assert time.monotonic() < deadline, "no model answer 30 s after the engine was killed"
        time.sleep(0.05)
    assert set(statuses) == {200}
    assert set(reasons) <= {"engine_unavailable"}
    assert [i["item_id"] for i in body["items"]] == expected  # the new engine: same model, same answer
    (new,) = engine_pids(proc)
    assert new != victim
    assert samples(url)[("ugt_serving_engine_restarts_total", ())] == 1
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["checks"]["engine"] == {"ok": True, "detail": f"engine process {new} up, 1 restarts"}
