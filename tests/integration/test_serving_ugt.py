"""/recommend with generator ugt against the real stack: a tiny UGT trained on ML-100K, the user's state
pushed through Feast into Redis, the app served by uvicorn and queried over HTTP.

Own user id and popularity domain per run, so nothing the Flink jobs write is touched.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import redis

from contracts.tokenizer import TokenizedEvent
from contracts.user_state_rule import states_from_events
from infra.settings import Settings
from models.train import fit
from models.train_config import load_config
from serving.app import create_app
from serving.config import build_config
from tests.integration.test_serving import Served, ensure_feast_applied

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
DOMAIN = f"itest-ugt-{RUN}"
USER = f"itest-ugt-user-{RUN}"
OTHER = f"itest-ugt-other-{RUN}"  # a second user, for a KV pool of one
HISTORY = ["50", "181", "100", "258", "1", "286", "294", "121", "300", "288"]  # ML-100K item ids, oldest first


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ugt")
    cfg = load_config("models/configs/ugt_ml100k_tiny.yaml",
                      {"out_dir": str(out), "progress": False, "device": "cpu", "max_epochs": 1, "max_users": 400})
    fit(cfg)
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def seeded(stack: Settings) -> Iterator[Settings]:
    from feast.data_source import PushMode

    from infra.feast_store import FeastRedisLayout, open_feature_store

    ensure_feast_applied(stack)
    base = 1_750_000_000_000
    events = [
        TokenizedEvent(event_id=f"{user}-{n}", user_id=user, item_id=item, event_time=base + n * 60_000,
                       domain=DOMAIN, action_token=2, rating_token=8, duration_token=0, hour_token=10)
        for user, history in ((USER, HISTORY), (OTHER, HISTORY[::-1][:6]))
        for n, item in enumerate(history)
    ]
    frame = pd.DataFrame([s.to_feature_row() for s in states_from_events(events).values()])
    frame["event_timestamp"] = datetime.now(timezone.utc)
    open_feature_store(stack).push("user_recent_events_push", frame, to=PushMode.ONLINE)
    client = redis.Redis.from_url(stack.redis_url)
    key = f"ugt:popularity:{DOMAIN}"
    client.zadd(key, {"1": 3.0, "2": 2.0, "3": 1.0})
    yield stack
    layout = FeastRedisLayout.from_repo(stack.feature_repo)
    client.delete(key, layout.entity_key("user_id", USER), layout.entity_key("user_id", OTHER))


def test_ugt_generator_answers_recommend(seeded: Settings, checkpoint: Path, tmp_path):
    config = build_config({"generator": "ugt", "checkpoint": str(checkpoint), "default_domain": DOMAIN},
                          env={}, base_dir=tmp_path)
    server = Served(create_app(seeded, config))
    try:
        r = server.post({"user_id": USER, "k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"].startswith("ugt-ugt-ml100k-tiny-"), body["model"]
        assert body["fallback"] is False and body["fallback_reason"] is None
        got = [item["item_id"] for item in body["items"]]
        assert len(got) == 10 and len(set(got)) == 10 and not set(got) & set(HISTORY)
        scores = [item["score"] for item in body["items"]]
        assert scores == sorted(scores, reverse=True)
        r = server.post({"user_id": USER, "k": 5, "exclude": got[:2]})
        assert [item["item_id"] for item in r.json()["items"]] == got[2:7]
    finally:
        server.stop()


def _lookups(server: Served) -> dict[str, float]:
    """ugt_serving_kv_cache_lookups_total by result, from the server's /metrics."""
    text = server.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^ugt_serving_kv_cache_lookups_total\{[^}]*result="(\w+)"[^}]*\} (\S+)$', text, re.M)}


def test_second_sight_keeps_a_new_user_out_of_a_full_kv_pool_over_http(seeded: Settings, checkpoint: Path, tmp_path):
    answers, lookups = {}, {}
    for admission in ("lru", "second_sight"):
        config = build_config({"generator": "ugt", "checkpoint": str(checkpoint), "default_domain": DOMAIN,
                               "kv_cache_users": 1, "kv_cache_admission": admission}, env={}, base_dir=tmp_path)
        server = Served(create_app(seeded, config))
        try:
            got = []
            for user in (USER, OTHER, OTHER, OTHER):
                r = server.post({"user_id": user, "k": 10})
                assert r.status_code == 200 and r.json()["fallback"] is False, r.text
                got.append([item["item_id"] for item in r.json()["items"]])
            answers[admission], lookups[admission] = got, _lookups(server)
        finally:
            server.stop()
    assert answers["second_sight"] == answers["lru"]  # who is cached never changes an answer
    # lru: OTHER evicts USER at once, then hits twice; second_sight: OTHER's first request is refused (the pool of
    # one is full), its second admits it (a miss), its third hits
    assert lookups["lru"] == {"hit": 2.0, "append": 0.0, "miss": 2.0}
    assert lookups["second_sight"] == {"hit": 1.0, "append": 0.0, "miss": 3.0}
