"""`ugt serve --workers 2` with ``engine_scope: model``: the workers run the pipeline, the engine only the UGT model.

As users run it (a subprocess, real Redis, state pushed through Feast): the answers equal the in-process service's
(same items, scores within float rounding); the rate limit of a key holds across both workers (kept by the engine,
asked with ADMIT frames); the engine's KV cache serves repeats and its counters reach /metrics on any worker; a
killed engine gives marked fallbacks (never a 5xx) and then the model's answer again.
"""

from __future__ import annotations

import os
import signal
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
RATE, BURST = 0.5, 60


@pytest.fixture(scope="module")
def served(seeded: Settings, checkpoint: Path, tmp_path_factory) -> Iterator[tuple[str, int, dict]]:  # noqa: F811
    folder = tmp_path_factory.mktemp("model-scope")
    config = {"generator": "ugt", "checkpoint": str(checkpoint), "default_domain": DOMAIN, "log_level": "warning",
              "engine_scope": "model", "api_keys": ["itest-key-a", "itest-key-b"], "rate_limit_rps": RATE,
              "rate_limit_burst": BURST, "torch_compile": False}
    server = start_server("model-scope", folder, os.environ | {"PYTHONPATH": str(REPO)}, config, workers=2)
    try:
        yield f"http://127.0.0.1:{server.port}", server.proc.pid, config
    finally:
        server.stop()


def recommend(url: str, key: str = "itest-key-b", k: int = 10) -> requests.Response:
    # a new connection per request: the kernel spreads them over both workers
    return requests.post(f"{url}/recommend", json={"user_id": USER, "k": k},
                         headers={"x-api-key": key, "connection": "close"}, timeout=10)


def model_answer(url: str, attempts: int = 40) -> dict:
    """The model's answer (a fallback while the engine starts or on a loaded box is asked again)."""
    for _ in range(attempts):
        r = recommend(url)
        assert r.status_code == 200, r.text
        if not r.json()["fallback"]:
            return r.json()
        time.sleep(0.25)
    raise AssertionError(f"only fallbacks: {r.json()}")


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def engine_pid(supervisor: int) -> int:
    """The engine: forked first, the workers after it."""
    kids = sorted(p.pid for p in process_tree(supervisor) if p.pid != supervisor)
    assert len(kids) == 3, kids  # two workers and the engine
    return kids[0]


def test_workers_answer_as_the_in_process_service(served, seeded: Settings, tmp_path):  # noqa: F811
    url, _, config = served
    body = model_answer(url)
    assert body["model"].startswith("ugt-ugt-ml100k-tiny-")
    alone = config | {"rate_limit_rps": 0, "engine_scope": "pipeline"}
    in_process = Served(create_app(seeded, build_config(alone, env={}, base_dir=tmp_path)))
    try:
        same = in_process.post({"user_id": USER, "k": 10}, headers={"x-api-key": "itest-key-b"}).json()
    finally:
        in_process.stop()
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in same["items"]]
    assert [i["score"] for i in body["items"]] == pytest.approx([i["score"] for i in same["items"]], abs=1e-4)
    assert not {i["item_id"] for i in body["items"]} & set(HISTORY)


def test_the_engine_keeps_the_kv_cache_and_metrics_add_up(served):
    url, _, _ = served
    model_answer(url)
    time.sleep(1.5)  # every worker has pushed its series
    before = samples(url)
    for _ in range(6):
        assert not recommend(url).json()["fallback"]
    time.sleep(1.5)
    after = samples(url)
    hits = ("ugt_serving_kv_cache_lookups_total", (("domain", DOMAIN), ("result", "hit")))
    ok = ("ugt_serving_requests_total", (("endpoint", "/recommend"), ("status", "200")))
    total = ("ugt_serving_stage_seconds_count", (("stage", "total"),))  # observed in the workers now
    assert after[hits] - before.get(hits, 0.0) == 6  # the same user again: the engine's cache is read
    assert after[ok] - before[ok] == 6
    assert after[total] - before[total] == 6


def test_the_rate_limit_of_a_key_holds_across_both_workers(served):
    url, _, _ = served
    statuses = [recommend(url, key="itest-key-a", k=3).status_code for _ in range(2 * BURST)]
    assert set(statuses) <= {200, 429}
    assert BURST <= statuses.count(200) <= BURST + 2, statuses  # one bucket for both workers


def test_a_killed_engine_gives_marked_fallbacks_then_the_model_again(served):
    url, supervisor, _ = served
    expected = [i["item_id"] for i in model_answer(url)["items"]]
    victim = engine_pid(supervisor)
    os.kill(victim, signal.SIGKILL)
    reasons = []
    deadline = time.monotonic() + 60
    while True:
        r = recommend(url)
        assert r.status_code == 200, r.text
        if not r.json()["fallback"]:
            break
        reasons.append(r.json()["fallback_reason"])
        assert time.monotonic() < deadline, "no model answer 60 s after the engine was killed"
        time.sleep(0.05)
    assert set(reasons) <= {"engine_unavailable"}
    assert [i["item_id"] for i in r.json()["items"]] == expected
    assert victim not in [p.pid for p in process_tree(supervisor)]
    time.sleep(1.5)  # the workers' metrics connections reconnect on their own tick
    assert samples(url)[("ugt_serving_engine_restarts_total", ())] == 1
