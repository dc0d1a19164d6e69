"""/recommend with generator ugt against the real stack: a tiny UGT trained on ML-100K, the user's state
pushed through Feast into Redis, the app served by uvicorn and queried over HTTP.

Own user id and popularity domain per run, so nothing the Flink jobs write is touched.
"""

from __future__ import annotations

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
        TokenizedEvent(event_id=f"{USER}-{n}", user_id=USER, item_id=item, event_time=base + n * 60_000,
                       domain=DOMAIN, action_token=2, rating_token=8, duration_token=0, hour_token=10)
        for n, item in enumerate(HISTORY)
    ]
    frame = pd.DataFrame([s.to_feature_row() for s in states_from_events(events).values()])
    frame["event_timestamp"] = datetime.now(timezone.utc)
    open_feature_store(stack).push("user_recent_events_push", frame, to=PushMode.ONLINE)
    client = redis.Redis.from_url(stack.redis_url)
    key = f"ugt:popularity:{DOMAIN}"
    client.zadd(key, {"1": 3.0, "2": 2.0, "3": 1.0})
    yield stack
    client.delete(key, FeastRedisLayout.from_repo(stack.feature_repo).entity_key("user_id", USER))


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
