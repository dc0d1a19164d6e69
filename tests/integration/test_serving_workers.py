"""`ugt serve --workers 2`: two HTTP workers and one shared engine, as users run it, against a real Redis.

Answers equal the single-process service's for the same users; the rate limit of a key holds across both workers;
/metrics on any worker adds up every process; a killed worker and a killed engine are replaced, and meanwhile
requests get 200s (marked fallbacks), never a 5xx. Only Redis is needed: the fixture starts only Redis.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.proc_cpu import process_tree
from bench.serving import start_server
from infra import stack as stack_mod
from infra.settings import Settings, get_settings
from serving.app import create_app
from serving.config import build_config
from tests.integration.test_serving import Served, seed_serving_state

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUN = uuid.uuid4().hex[:8]
DOMAIN = f"itest-workers-{RUN}"
USERS = {f"itest-workers-{RUN}-{n}": [str(i) for i in range(n, n + 4)] for n in range(3)}
POPULAR = {str(i): float(100 - i) for i in range(20)}
RATE, BURST = 0.5, 100


@pytest.fixture(scope="module")
def redis_only() -> Iterator[Settings]:
    """Only Redis of the stack (this test needs nothing else), user states pushed through Feast."""
    settings = get_settings()
    stack_mod.up(only=["redis"], settings=settings, log=lambda line: None)
    client = seed_serving_state(settings, USERS, DOMAIN, POPULAR)
    yield settings
    client.delete(f"ugt:popularity:{DOMAIN}")


@pytest.fixture(scope="module", params=["fork", "spawn"])
def served(request, redis_only: Settings, tmp_path_factory) -> Iterator[tuple[str, int, dict]]:
    """The engine forked (CPU models) or spawned (how a CUDA model's engine starts: serving/engine_spawn.py)."""
    folder = tmp_path_factory.mktemp("workers")
    config = {"generator": "popularity", "default_domain": DOMAIN, "log_level": "warning",
              "api_keys": ["itest-key-a", "itest-key-b", "itest-key-c"], "rate_limit_rps": RATE, "rate_limit_burst": BURST,
              "engine_start": request.param}
    server = start_server("workers", folder, os.environ | {"PYTHONPATH": str(REPO)}, config, workers=2)
    try:
        # a spawned engine imports and composes the service itself: it answers a moment after the workers do
        _all_200_until_served(f"http://127.0.0.1:{server.port}", next(iter(USERS)), key="itest-key-b")
        yield f"http://127.0.0.1:{server.port}", server.proc.pid, config
    finally:
        server.stop()


def recommend(url: str, user: str, key: str = "itest-key-a") -> requests.Response:
    # a new connection per request: the kernel spreads them over both workers' accept queues
    return requests.post(f"{url}/recommend", json={"user_id": user, "k": 5}, headers={"x-api-key": key,
                         "connection": "close"}, timeout=10)


def served_by_model(url: str, user: str, attempts: int = 20) -> requests.Response:
    """The model's answer for ``user``: a request that timed out on a loaded box (a marked fallback) is asked
    again, a few times; what is compared is the answer, not the box's speed."""
    for _ in range(attempts):
        answer = recommend(url, user, key="itest-key-b")
        if answer.status_code != 200 or not answer.json()["fallback"]:
            return answer
        time.sleep(0.2)
    return answer


def children(pid: int) -> list[int]:
    return sorted(p.pid for p in process_tree(pid) if p.pid != pid)


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_two_workers_answer_as_the_single_process_service(served, redis_only: Settings, tmp_path):
    url, pid, config = served
    assert len(children(pid)) == 3  # two workers and the engine
    shared = {user: served_by_model(url, user) for user in USERS}
    alone_config = config | {"rate_limit_rps": 0, "engine_start": "auto"}
    single = Served(create_app(redis_only, build_config(alone_config, env={}, base_dir=tmp_path)))
    try:
        alone = {user: single.post({"user_id": user, "k": 5}, headers={"x-api-key": "itest-key-b"}) for user in USERS}
    finally:
        single.stop()
    for user, history in USERS.items():
        assert shared[user].status_code == alone[user].status_code == 200, shared[user].text
        got, want = shared[user].json(), alone[user].json()
        assert got["items"] == want["items"] and got["model"] == want["model"] and not got["fallback"]
        assert not {i["item_id"] for i in got["items"]} & set(history)  # the state was read in the engine


def test_the_rate_limit_of_a_key_holds_across_both_workers(served):
    url, _, _ = served
    statuses = [recommend(url, next(iter(USERS)), key="itest-key-a") for _ in range(2 * BURST)]
    ok = [r for r in statuses if r.status_code == 200]
    limited = [r for r in statuses if r.status_code == 429]
    assert len(ok) + len(limited) == len(statuses)
    # one bucket for both workers: the burst and what refilled meanwhile, not twice that
    assert BURST <= len(ok) <= BURST + 2, [r.status_code for r in statuses]
    assert all(int(r.headers["retry-after"]) >= 1 for r in limited)


def test_metrics_on_any_worker_add_up_every_process(served):
    url, _, _ = served
    time.sleep(1.5)  # every worker has pushed its series since the last test
    before = samples(url)
    for _ in range(6):
        assert recommend(url, next(iter(USERS)), key="itest-key-b").status_code == 200
    time.sleep(1.5)
    after = samples(url)
    ok = ("ugt_serving_requests_total", (("endpoint", "/recommend"), ("status", "200")))
    total = ("ugt_serving_stage_seconds_count", (("stage", "total"),))  # observed in the engine
    assert after[ok] - before[ok] == 6  # the HTTP counts of both workers, summed
    assert after[total] - before[total] == 6
    assert after[("ugt_serving_state_users_total", ())] >= after[("ugt_serving_state_round_trips_total", ())] > 0


def _all_200_until_served(url: str, user: str, timeout_s: float = 30.0,
                          key: str = "itest-key-c") -> tuple[set[int], set[str]]:
    statuses, reasons = set(), set()
    deadline = time.monotonic() + timeout_s
    while True:
        r = recommend(url, user, key=key)
        statuses.add(r.status_code)
        body = r.json()
        if r.status_code == 200 and not body["fallback"]:
            return statuses, reasons
        reasons.add(body.get("fallback_reason"))
        assert time.monotonic() < deadline, f"not served by the model {timeout_s} s after the kill: {body}"
        time.sleep(0.05)


def test_a_killed_worker_and_a_killed_engine_are_replaced_with_fallbacks_only(served):
    url, pid, _ = served
    user = next(iter(USERS))
    expected = recommend(url, user, key="itest-key-c").json()["items"]
    for role in ("worker", "engine"):
        # the engine is forked first, the workers after it (and a replaced worker later still)
        victim = max(children(pid)) if role == "worker" else min(children(pid))
        os.kill(victim, signal.SIGKILL)
        statuses, reasons = _all_200_until_served(url, user)
        assert statuses == {200} and reasons <= {"engine_unavailable"}
        time.sleep(1.0)  # each worker reconnects on its own (every 0.2 s): by now both have
        again = recommend(url, user, key="itest-key-c").json()
        assert again["items"] == expected, (role, again, expected)
        deadline = time.monotonic() + 10
        while len(children(pid)) != 3 or victim in children(pid):
            assert time.monotonic() < deadline, "the dead process was not replaced"
            time.sleep(0.1)
    time.sleep(1.5)
    restarts = samples(url)
    assert restarts[("ugt_serving_engine_restarts_total", ())] == 1  # each param has its own server
    assert restarts[("ugt_serving_worker_restarts_total", ())] >= 1
