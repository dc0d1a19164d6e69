"""The cluster profile's serving: two `ugt serve` replicas on two ports read the same Redis Cluster state (issue #20).

Brings up the cluster profile's Redis Cluster (3 masters + 3 replicas) on the stack's ports + 800 in
var/serving-replicas-test/ (bench.drills.drill_settings), writes users' `user_recent_events` rows through Feast
(redis_type redis_cluster) and a popularity set, then starts two real `ugt serve` processes on two free ports,
exactly as docs/STACK.md tells a user to run them behind a load balancer. Both must answer every request with the
same list: a known user (popular items minus what they saw), an unknown user (the fallback), and, after that user's
state changes in Redis, the new state from both (no replica keeps a stale copy). Stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import requests
from user_state_exactly_once_cluster import free_port

from bench.drills import drill_settings
from contracts.redis_keys import popularity_key
from contracts.tokenizer import TokenizedEvent
from contracts.user_state_rule import states_from_events
from infra import stack as stack_mod
from infra.redis_client import redis_client
from infra.settings import REPO_ROOT, Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORT_OFFSET = 800
RUN = uuid.uuid4().hex[:8]
DOMAIN = f"rep{RUN}"
POPULAR = {f"p{i}": float(100 - i) for i in range(1, 11)}


@pytest.fixture(scope="module")
def cluster_redis() -> Iterator[Settings]:
    saved = dict(os.environ)
    settings = drill_settings(PORT_OFFSET, folder="serving-replicas-test")
    try:
        stack_mod.up(only=["redis"], settings=settings, log=print)
        yield settings
    finally:
        stack_mod.down(only=["redis"], settings=settings, log=print)
        os.environ.clear()
        os.environ.update(saved)


def write_states(settings: Settings, histories: dict[str, list[str]]) -> None:
    """Users' rows through user_state's own Feast writer (the cluster-aware online store)."""
    from infra.feast_store import open_feature_store
    from jobs.user_state_logic import FEATURE_VIEW, feast_direct_writer

    events = [TokenizedEvent(event_id=f"{user}-{n}", user_id=user, item_id=item, event_time=1_750_000_000_000 + n,
                             domain=DOMAIN, action_token=2, rating_token=8, duration_token=0, hour_token=10)
              for user, items in histories.items() for n, item in enumerate(items)]
    store = open_feature_store(settings)
    try:
        store.get_feature_view(FEATURE_VIEW)
    except Exception:
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "feast"), "-c", str(settings.feature_repo),
                        "apply"], check=True, capture_output=True, timeout=300)
    feast_direct_writer(store)([s.to_feature_row() for s in states_from_events(events).values()])


@pytest.fixture(scope="module")
def replicas(cluster_redis: Settings) -> Iterator[list[str]]:
    redis_client(cluster_redis).zadd(popularity_key(DOMAIN), POPULAR)
    env = {**os.environ, "UGT_SERVING_DEFAULT_DOMAIN": DOMAIN, "UGT_SERVING_ENGINE": "thread"}
    ports = [free_port(), free_port()]
    logs = [open(cluster_redis.log_dir / f"serve-{port}.log", "wb") for port in ports]  # noqa: SIM115
    servers = [subprocess.Popen([sys.executable, "-m", "ugt", "serve", "--port", str(port)], cwd=REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT) for port, log in zip(ports, logs, strict=True)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 120
        for url, server in zip(urls, servers, strict=True):
            while True:
                assert server.poll() is None, f"ugt serve exited; see {cluster_redis.log_dir}"
                try:
                    if requests.get(f"{url}/health", timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, f"ugt serve at {url} not healthy in 120 s"
                time.sleep(0.5)
        yield urls
    finally:
        for server in servers:
            server.terminate()
        for server, log in zip(servers, logs, strict=True):
            server.wait(timeout=30)
            log.close()
        client = redis_client(cluster_redis)
        client.delete(popularity_key(DOMAIN))


def answers(urls: list[str], user: str) -> list[tuple[list[str], list[float], bool]]:
    out = []
    for url in urls:
        response = requests.post(f"{url}/recommend", json={"user_id": user, "k": 4}, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        out.append(([i["item_id"] for i in body["items"]], [i["score"] for i in body["items"]], body["fallback"]))
    return out


def test_both_replicas_answer_alike_from_the_same_cluster_state(cluster_redis: Settings, replicas: list[str]) -> None:
    known, other = f"rk-{RUN}", f"ro-{RUN}"
    write_states(cluster_redis, {known: ["p1", "p3", "p7"]})
    first, second = answers(replicas, known)
    assert first == second == (["p2", "p4", "p5", "p6"], [98.0, 96.0, 95.0, 94.0], False)
    first, second = answers(replicas, other)
    assert first == second == (["p1", "p2", "p3", "p4"], [99.0, 98.0, 97.0, 96.0], True)
    write_states(cluster_redis, {other: ["p1", "p2"]})  # a new user's state lands: both replicas read it
    deadline = time.monotonic() + 10  # serving caches nothing per user; popularity refreshes every second
    while (got := answers(replicas, other)) != [(["p3", "p4", "p5", "p6"], [97.0, 96.0, 95.0, 94.0], False)] * 2:
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
