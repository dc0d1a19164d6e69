"""/recommend against the real stack: state pushed through Feast into Redis, popularity in a Redis ZSET,
the app served by uvicorn on a free port and queried over HTTP. Both state readers are exercised.

Each test run uses its own user ids and its own popularity domain, so it never disturbs data the
Flink jobs write (domain "movie").
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import redis
import requests
import uvicorn

from contracts.tokenizer import TokenizedEvent
from contracts.user_state_rule import states_from_events
from infra.settings import Settings
from serving.app import create_app
from serving.config import ServingConfig
from serving.user_state_reader import FeastStateReader, RedisStateReader

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
DOMAIN = f"itest-{RUN}"
POPULAR = {f"p{i}": float(100 - i) for i in range(1, 11)}  # p1 most popular ... p10 least
HISTORY = ["p1", "p3", "p7"]  # what the known user has seen (oldest first)
KNOWN = f"itest-user-{RUN}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A uvicorn server for one app, in a thread; `.url` is its base URL."""

    def __init__(self, app) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.05)

    def post(self, body, **kw) -> requests.Response:
        return requests.post(f"{self.url}/recommend", json=body, timeout=10, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=10, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def events_for(user_id: str, items: list[str]) -> list[TokenizedEvent]:
    base = 1_750_000_000_000
    return [
        TokenizedEvent(
            event_id=f"{user_id}-{n}",
            user_id=user_id,
            item_id=item,
            event_time=base + n * 1000,
            domain=DOMAIN,
            action_token=2,
            rating_token=8,
            duration_token=0,
            hour_token=10,
        )
        for n, item in enumerate(items)
    ]


def ensure_feast_applied(settings: Settings) -> None:
    """`feast apply` the repo when its registry lacks what serving reads (a fresh clone has no registry)."""
    from infra.feast_store import open_feature_store

    try:
        open_feature_store(settings).get_feature_service("recommend_v1")
        return
    except Exception:
        pass
    feast = str(Path(sys.executable).parent / "feast")
    subprocess.run(
        [feast, "-c", str(settings.feature_repo), "apply"], check=True, capture_output=True, timeout=300
    )


def push_states(settings: Settings, histories: dict[str, list[str]]) -> None:
    from feast.data_source import PushMode

    from infra.feast_store import open_feature_store

    store = open_feature_store(settings)
    events = [e for user, items in histories.items() for e in events_for(user, items)]
    rows = [state.to_feature_row() for state in states_from_events(events).values()]
    frame = pd.DataFrame(rows)
    frame["event_timestamp"] = datetime.now(timezone.utc)
    store.push("user_recent_events_push", frame, to=PushMode.ONLINE)


def seed_serving_state(settings: Settings, histories: dict[str, list[str]], domain: str,
                       popular: dict[str, float]) -> redis.Redis:
    """What a served domain needs in Redis: the Feast repo applied, users' states pushed, a popularity list;
    returns the client (the caller deletes ``ugt:popularity:<domain>`` when done)."""
    ensure_feast_applied(settings)
    push_states(settings, histories)
    client = redis.Redis.from_url(settings.redis_url)
    client.zadd(f"ugt:popularity:{domain}", popular)
    return client


@pytest.fixture(scope="module")
def seeded(stack: Settings) -> Iterator[Settings]:
    ensure_feast_applied(stack)
    push_states(stack, {KNOWN: HISTORY})
    client = redis.Redis.from_url(stack.redis_url)
    key = f"ugt:popularity:{DOMAIN}"
    client.zadd(key, POPULAR)
    yield stack
    from infra.feast_store import FeastRedisLayout

    # Leave the shared Redis as found: the test domain's set and the test user's Feast hash.
    client.delete(key, FeastRedisLayout.from_repo(stack.feature_repo).entity_key("user_id", KNOWN))


@pytest.fixture(scope="module", params=["redis", "feast"])
def served(request, seeded: Settings) -> Iterator[Served]:
    config = ServingConfig(state_reader=request.param, default_domain=DOMAIN)
    server = Served(create_app(seeded, config))
    yield server
    server.stop()


def ids(body) -> list[str]:
    return [item["item_id"] for item in body["items"]]


def test_known_user_gets_popular_items_it_has_not_seen(served: Served):
    r = served.post({"user_id": KNOWN, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert ids(body) == ["p2", "p4", "p5", "p6"]
    assert [item["score"] for item in body["items"]] == [98.0, 96.0, 95.0, 94.0]
    assert body["fallback"] is False and body["fallback_reason"] is None
    assert body["model"] == "popularity-v1"
    assert body["timings_ms"]["total"] > 0


def test_exclude_and_explicit_domain(served: Served):
    body = served.post({"user_id": KNOWN, "k": 3, "exclude": ["p2", "p5"], "domain": DOMAIN}).json()
    assert ids(body) == ["p4", "p6", "p8"]
    assert not set(ids(body)) & set(HISTORY)


def test_unknown_user_gets_the_fallback(served: Served):
    body = served.post({"user_id": f"never-seen-{uuid.uuid4().hex}", "k": 3}).json()
    assert ids(body) == ["p1", "p2", "p3"]
    assert body["fallback"] is True and body["fallback_reason"] == "unknown_user"
    assert body["model"] == "popularity-fallback-v1"


def test_bad_requests_are_4xx_with_messages(served: Served):
    r = served.post({"user_id": KNOWN, "k": 1001})
    assert r.status_code == 422 and "k: Input should be less than or equal to 1000" in r.json()["message"]
    r = served.post({"user_id": "", "k": 3})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "user_id"
    r = requests.post(
        f"{served.url}/recommend", data=b"{oops", headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_json"
    r = requests.post(
        f"{served.url}/recommend",
        data=b"x" * 70_000,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413 and "65536" in r.json()["message"]


def test_metrics_count_what_happened(served: Served):
    served.post({"user_id": KNOWN, "k": 2})
    served.post({"user_id": f"never-seen-{uuid.uuid4().hex}", "k": 2})
    served.post({"user_id": KNOWN, "k": 0})
    text = requests.get(f"{served.url}/metrics", timeout=10).text
    assert 'ugt_serving_requests_total{endpoint="/recommend",status="200"}' in text
    assert 'ugt_serving_requests_total{endpoint="/recommend",status="422"}' in text
    assert 'ugt_serving_fallbacks_total{reason="unknown_user"}' in text
    assert 'ugt_serving_stage_seconds_bucket{le="0.005",stage="state"}' in text
    assert 'ugt_serving_popularity_source_total{source="redis"}' in text


def test_health_is_ok(served: Served):
    r = requests.get(f"{served.url}/health", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    assert all(check["ok"] for check in r.json()["checks"].values())


def test_the_two_readers_agree(seeded: Settings):
    from infra.feast_store import FeastRedisLayout, open_feature_store

    client = redis.Redis.from_url(seeded.redis_url)
    sdk = FeastStateReader(open_feature_store(seeded), "recommend_v1", client)
    direct = RedisStateReader(client, FeastRedisLayout.from_repo(seeded.feature_repo), "user_recent_events")
    state = sdk.read(KNOWN)
    assert state is not None and state.item_ids == tuple(HISTORY) and state.event_count == 3
    assert direct.read(KNOWN) == state
    assert sdk.read("nobody-" + RUN) is None and direct.read("nobody-" + RUN) is None


@pytest.mark.parametrize("reader", ["redis", "feast"])
def test_unreachable_redis_answers_from_the_popularity_file(seeded: Settings, tmp_path, monkeypatch, reader):
    popular_file = tmp_path / "popularity.json"
    popular_file.write_text(
        json.dumps(
            {
                "version": 1,
                "domains": {
                    DOMAIN: [
                        {"item_id": "f1", "score": 9},
                        {"item_id": "f2", "score": 8},
                        {"item_id": "f3", "score": 7},
                    ]
                },
            }
        )
    )
    monkeypatch.setenv("UGT_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    dead = Settings()
    config = ServingConfig(state_reader=reader, default_domain=DOMAIN, popularity_file=str(popular_file))
    server = Served(create_app(dead, config))
    try:
        r = server.post({"user_id": KNOWN, "k": 2, "exclude": ["f1"]})
        assert r.status_code == 200, r.text
        assert ids(r.json()) == ["f2", "f3"]
        assert r.json()["fallback"] is True and r.json()["fallback_reason"] == "state_unavailable"
        health = requests.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["checks"]["redis"]["ok"] is False
    finally:
        server.stop()


def test_redis_dying_mid_run_keeps_answering_from_the_cached_list(seeded: Settings, tmp_path, monkeypatch):
    """A Redis of our own (the stack's must stay up): seed it, serve, kill it, serve again."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        own = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                own.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        monkeypatch.setenv("UGT_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        settings = Settings()
        push_states(settings, {KNOWN: HISTORY})
        own.zadd(f"ugt:popularity:{DOMAIN}", POPULAR)
        config = replace(ServingConfig(default_domain=DOMAIN), popularity_refresh_s=0.05)
        server = Served(create_app(settings, config))
        try:
            assert ids(server.post({"user_id": KNOWN, "k": 2}).json()) == ["p2", "p4"]
            proc.kill()
            proc.wait(timeout=10)
            time.sleep(0.1)  # past the refresh interval: the next request tries Redis and fails
            r = server.post({"user_id": KNOWN, "k": 3, "exclude": ["p2"]})
            assert r.status_code == 200, r.text
            assert ids(r.json()) == ["p1", "p3", "p4"]  # history unknown now; the cached list still answers
            assert r.json()["fallback_reason"] == "state_unavailable"
            text = requests.get(f"{server.url}/metrics", timeout=10).text
            assert 'ugt_serving_popularity_source_total{source="redis_stale"}' in text
        finally:
            server.stop()
    finally:
        proc.kill()
        proc.wait(timeout=10)
