"""/recommend on a REAL Redis of its own: Redis stopped mid-test -> fallback answers, never a 5xx; restarted ->
answers from the user's state again; concurrent HTTP requests share batches.

The test starts a private redis-server on a free port (the shared stack's Redis is never touched), with an
append-only file so a restart brings the pushed state back, as a production Redis with persistence would.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from infra.settings import Settings
from serving.app import create_app
from serving.config import ServingConfig
from tests.integration.test_serving import Served, ensure_feast_applied, free_port, ids, push_states

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
DOMAIN = f"itest-robust-{RUN}"
POPULAR = {f"p{i}": float(100 - i) for i in range(1, 41)}
HISTORY = ["p1", "p3", "p7"]
KNOWN = f"itest-robust-user-{RUN}"


class PrivateRedis:
    """A redis-server of this test only; ``stop()`` / ``start()`` keep the port and the data (AOF)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.client = redis.Redis(port=self.port, socket_timeout=2)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.client.ping():
                    return
            except redis.ConnectionError:
                pass
            assert self.proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer in 15 s"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis flushes the AOF and exits
            self.proc.wait(timeout=15)
        self.proc = None


@pytest.fixture(scope="module")
def private_redis(stack: Settings, tmp_path_factory) -> Iterator[tuple[PrivateRedis, Settings]]:
    ensure_feast_applied(stack)  # the registry serving reads (the stack's own Redis is not used)
    own = PrivateRedis(tmp_path_factory.mktemp("redis"))
    own.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("UGT_REDIS_URL", f"redis://127.0.0.1:{own.port}/0")
    try:
        settings = Settings()
        push_states(settings, {KNOWN: HISTORY})
        own.client.zadd(f"ugt:popularity:{DOMAIN}", POPULAR)
        yield own, settings
    finally:
        mp.undo()
        own.stop()


def test_redis_stopped_mid_test_gives_fallbacks_not_5xx_and_recovers(private_redis):
    own, settings = private_redis
    config = replace(ServingConfig(default_domain=DOMAIN), popularity_refresh_s=0.05, redis_timeout_ms=100)
    server = Served(create_app(settings, config))
    try:
        r = server.post({"user_id": KNOWN, "k": 3})
        assert r.status_code == 200 and r.json()["fallback"] is False, r.text
        assert ids(r.json()) == ["p2", "p4", "p5"]

        own.stop()
        time.sleep(0.1)  # past popularity_refresh_s: the next requests try Redis and fail
        with ThreadPoolExecutor(8) as pool:
            down = list(pool.map(lambda _: server.post({"user_id": KNOWN, "k": 3}), range(16)))
        assert [r.status_code for r in down] == [200] * 16, [r.text for r in down if r.status_code != 200]
        assert all(r.json()["fallback"] is True for r in down)
        assert {r.json()["fallback_reason"] for r in down} == {"state_unavailable"}
        assert ids(down[0].json()) == ["p1", "p2", "p3"]  # the cached popular list; history unknown now

        own.start()  # same port, same AOF: the state is back
        deadline = time.monotonic() + 15
        unavailable = 16  # the pooled connections died with Redis: a request may still fall back once it is up
        while True:
            r = server.post({"user_id": KNOWN, "k": 3})
            assert r.status_code == 200, r.text
            if r.json()["fallback"] is False:
                break
            assert r.json()["fallback_reason"] == "state_unavailable", r.text
            unavailable += 1
            assert time.monotonic() < deadline, f"no recovery after Redis restart: {r.text}"
            time.sleep(0.1)
        assert ids(r.json()) == ["p2", "p4", "p5"]
        metrics = server.get("/metrics").text
        assert f'ugt_serving_fallbacks_total{{reason="state_unavailable"}} {unavailable}.0' in metrics, metrics
        assert 'ugt_serving_requests_total{endpoint="/recommend",status="500"}' not in metrics
    finally:
        server.stop()


def test_concurrent_http_requests_are_batched_on_real_redis(private_redis):
    _, settings = private_redis
    config = replace(ServingConfig(default_domain=DOMAIN), batch_max_size=32, batch_max_wait_ms=20)
    server = Served(create_app(settings, config))
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: server.post({"user_id": KNOWN, "k": 2}), range(48)))
        assert all(r.status_code == 200 for r in answers)
        bodies = [r.json() for r in answers]
        assert all(ids(b) == ["p2", "p4"] and b["fallback"] is False for b in bodies)  # same state for all
        assert max(b["batch_size"] for b in bodies) > 1
        metrics = server.get("/metrics").text
        count = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("ugt_serving_batch_size_count")))
        assert count < 48  # fewer batches than requests
    finally:
        server.stop()


RULE_CATS = {"p2": ["Horror"], "p4": ["Comedy"], "p5": ["Comedy"], "p6": ["Comedy", "Drama"],
             "p8": ["Documentary"], "p9": ["Drama"], "p10": ["Drama"]}


def test_router_and_business_rules_with_categories_from_feast(private_redis):
    """The domain's rules read item categories from Feast's item_metadata view (pushed into this Redis)."""
    from datetime import datetime, timezone

    import pandas as pd
    from feast.data_source import PushMode

    from infra.feast_store import open_feature_store
    from serving.config import build_config

    _, settings = private_redis
    frame = pd.DataFrame(
        [{"item_id": item, "title": item, "domain": DOMAIN, "categories": cats, "year": 2000, "semantic_ids": []}
         for item, cats in RULE_CATS.items()]
    )
    frame["event_timestamp"] = datetime.now(timezone.utc)
    open_feature_store(settings).push("item_metadata_push", frame, to=PushMode.ONLINE)
    config = build_config(
        {"default_domain": DOMAIN,
         "domains": {DOMAIN: {"rerank": {"drop_categories": ["Horror"], "caps": {"Comedy": 1}, "pool": 5}},
                     "plain": {}}},
        env={},
    )
    server = Served(create_app(settings, config))
    try:
        # popularity minus history (p1 p3 p7): p2 p4 p5 p6 p8 p9 p10 ...; Horror dropped, one Comedy
        body = server.post({"user_id": KNOWN, "k": 4}).json()
        assert ids(body) == ["p4", "p8", "p9", "p10"], body
        r = server.post({"user_id": KNOWN, "k": 4, "domain": "elsewhere"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "domain"
    finally:
        server.stop()


def test_batched_reads_agree_between_feast_sdk_and_direct_redis(private_redis):
    from infra.feast_store import FeastRedisLayout, open_feature_store
    from serving.user_state_reader import FeastStateReader, RedisStateReader

    own, settings = private_redis
    client = redis.Redis(port=own.port)
    sdk = FeastStateReader(open_feature_store(settings), "recommend_v1", client)
    direct = RedisStateReader(client, FeastRedisLayout.from_repo(settings.feature_repo), "user_recent_events")
    users = [KNOWN, f"nobody-{RUN}", KNOWN]
    got = direct.read_many(users)
    assert got == sdk.read_many(users)
    assert got[0] is not None and got[0].item_ids == tuple(HISTORY) and got[1] is None and got[2] == got[0]
