"""New items served without a retrain, on the real stack: a tiny UGT that embeds items by semantic ID (ML-100K,
synthetic codes), its codes in Redis as the item job's index, brand-new items announced on the version's feed by
the job's own writer (RedisSidIndex.write_new), and a generator that picks them up.

What fails without the live catalog: a history item the model has never seen is dropped from the input, so a user
who watched a new item gets the same answer as one who did not, and the new item can never be recommended.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from contracts.redis_keys import code_string, feed_entry, feed_key, index_key, item_key
from contracts.tokenizer import TokenizedEvent
from contracts.user_state_rule import STATE_VERSION, states_from_events
from infra.settings import Settings
from jobs.item_semantic_ids_logic import RedisSidIndex
from models.checkpoint import load_checkpoint
from models.train import fit
from models.train_config import load_config
from serving.app import create_app
from serving.config import build_config
from serving.generator import GenerationRequest
from serving.ugt_generator import UGTGenerator
from serving.user_state_reader import UserStateView
from tests.integration.test_serving import Served, ensure_feast_applied

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
DOMAIN = f"itest-live-{RUN}"
SIZES = [8, 8, 64]
HISTORY = ["50", "181", "100", "258", "1", "286", "294", "121", "300", "288"]  # ML-100K item ids, oldest first
BASE_MS = 1_750_000_000_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One epoch of the tiny UGT with item_repr id+sid and the semantic-ID head, codes from a synthetic export."""
    from contracts.datasets import load_dataset

    out = tmp_path_factory.mktemp("ugt-live")
    items = [str(i) for i in load_dataset("ml-100k").items["item_id"]]
    order = np.random.default_rng(0).permutation(len(items))  # unique (l1, l2, dedup) per item
    codes = np.stack([order % 8, (order // 8) % 8, order // 64], 1)
    np.savez(out / "sid.npz", codes=codes, item_ids=np.asarray(items), codebook_sizes=np.asarray(SIZES))
    cfg = load_config("models/configs/ugt_ml100k_tiny.yaml", {
        "out_dir": str(out), "progress": False, "device": "cpu", "max_epochs": 1, "max_users": 400,
        "model_config.embedding.item_repr": "id+sid", "model_config.heads.semantic_id": True,
        "semantic_ids": {"artifact": str(out / "sid.npz")}})
    fit(cfg)
    return out / "checkpoint.pt"


@dataclass
class Index:
    client: redis.Redis
    version: str


@pytest.fixture
def indexed(stack: Settings, checkpoint: Path) -> Iterator[Index]:
    """The checkpoint's codes as a fresh version's decode index (one per test), as the item job seeds it."""
    version = f"itest-live-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(stack.redis_url)
    _, _, _, ckpt = load_checkpoint(checkpoint)
    codes = ckpt["semantic_codes"]
    RedisSidIndex(client, version).write((item, code_string(codes[index])) for item, index in ckpt["vocab"].items())
    yield Index(client, version)
    client.delete(index_key(version), item_key(version), feed_key(version))


def unused_code(index: Index, n: int) -> list[tuple[int, int, int]]:
    """n full semantic IDs that no item of the version holds (what the job's dedup allocator would hand out)."""
    taken = {c.decode() for c in index.client.hkeys(index_key(index.version))}
    free = [c for c in np.ndindex(*SIZES) if code_string(c) not in taken]
    return [tuple(int(x) for x in c) for c in free[-n:]]


def new_item(index: Index, item_id: str, code: tuple[int, ...], genres: list[str], year: int) -> None:
    RedisSidIndex(index.client, index.version).write_new([feed_entry({"item_id": item_id, "genres": genres, "year": year},
                                                         code_string(code))])


def view(user: str, items: list[str]) -> UserStateView:
    times = [BASE_MS + n * 60_000 for n in range(len(items))]
    return UserStateView(user_id=user, item_ids=tuple(items), action_tokens=(2,) * len(items),
                         rating_tokens=(8,) * len(items), event_times=tuple(times), event_count=len(items),
                         last_event_time=times[-1], state_version=STATE_VERSION)


def test_a_new_item_is_served_seconds_after_the_feed_announces_it(indexed: Index, checkpoint: Path,
                                                                   stack: Settings):
    gen = UGTGenerator(checkpoint, clock=lambda: BASE_MS / 1000 + 3600, live_items=4, sid_version=indexed.version,
                       redis_factory=lambda: redis.Redis.from_url(stack.redis_url, socket_timeout=5))
    catalog = gen.num_items
    new_a, new_b = f"live-a-{RUN}", f"live-b-{RUN}"
    watched = view("u1", [*HISTORY, new_a])
    not_watched = view("u2", HISTORY)

    def ask(state: UserStateView, k: int, exclude=frozenset()):
        (answer,) = gen.recommend_batch([GenerationRequest(state, k, frozenset(exclude), DOMAIN)])
        return [(item, round(score, 6)) for item, score in answer]

    assert ask(watched, 20) == ask(not_watched, 20)  # unknown item: dropped from the input
    gen.start_background()
    code_a, code_b = unused_code(indexed, 2)
    announced = time.time()
    new_item(indexed, new_a, code_a, ["Comedy", "Romance"], 2015)
    new_item(indexed, new_b, code_b, ["Sci-Fi"], 1999)
    new_item(indexed, f"live-dup-{RUN}", tuple(int(c) for c in indexed.client.hget(item_key(indexed.version), "1").split(b"-")),
             [], 1990)  # another item's code: never served
    new_item(indexed, new_a, code_b, [], 2015)  # announced again (a replayed job): the first code stands
    served = 0
    deadline = time.monotonic() + 30
    while served < 2 and time.monotonic() < deadline:
        served += gen.apply_new_items()
        time.sleep(0.01)
    delay = time.time() - announced
    print(f"\nnew items servable {delay:.3f} s after the feed announced them")
    assert served == 2, gen.live.stats
    assert gen.live.stats.rejected == {"duplicate_code": 1, "known": 1}
    assert gen.live.stats.version == indexed.version and gen.live.stats.state == "following"

    everything = [item for item, _ in ask(not_watched, catalog + 2)]
    assert {new_a, new_b} <= set(everything) and len(everything) == catalog + 2 - len(HISTORY)
    assert new_a not in [item for item, _ in ask(not_watched, catalog + 2, {new_a})]
    assert ask(watched, 20) != ask(not_watched, 20)  # the new item is in the input now
    assert new_a not in [item for item, _ in ask(watched, catalog + 2)]  # and masked as seen
    gen.live.stop()


@pytest.fixture
def pushed(stack: Settings) -> Iterator[tuple[str, str, str]]:
    """Two users in Redis through Feast: one whose history ends with a brand-new item, one without it."""
    from feast.data_source import PushMode

    from infra.feast_store import FeastRedisLayout, open_feature_store

    ensure_feast_applied(stack)
    item = f"live-c-{RUN}"
    users = (f"itest-live-w-{RUN}", f"itest-live-n-{RUN}")
    events = []
    for user, items in zip(users, ([*HISTORY, item], HISTORY), strict=True):
        events += [TokenizedEvent(event_id=f"{user}-{n}", user_id=user, item_id=i, event_time=BASE_MS + n * 60_000,
                                  domain=DOMAIN, action_token=2, rating_token=8, duration_token=0, hour_token=10)
                   for n, i in enumerate(items)]
    frame = pd.DataFrame([s.to_feature_row() for s in states_from_events(events).values()])
    frame["event_timestamp"] = datetime.now(timezone.utc)
    open_feature_store(stack).push("user_recent_events_push", frame, to=PushMode.ONLINE)
    client = redis.Redis.from_url(stack.redis_url)
    client.zadd(f"ugt:popularity:{DOMAIN}", {"1": 3.0, "2": 2.0})
    yield users[0], users[1], item
    layout = FeastRedisLayout.from_repo(stack.feature_repo)
    client.delete(f"ugt:popularity:{DOMAIN}", *(layout.entity_key("user_id", u) for u in users))


def test_the_service_in_its_engine_process_follows_the_feed(indexed: Index, checkpoint: Path,
                                                            pushed: tuple[str, str, str], tmp_path):
    watched, not_watched, item = pushed
    config = build_config({"generator": "ugt", "checkpoint": str(checkpoint), "default_domain": DOMAIN,
                           "engine": "process", "live_items": 8, "sid_version": indexed.version}, env={}, base_dir=tmp_path)
    from infra.settings import get_settings

    server = Served(create_app(get_settings(), config))
    try:
        def items_of(user: str) -> list[str]:
            r = server.post({"user_id": user, "k": 10})
            assert r.status_code == 200 and r.json()["fallback"] is False, r.text
            return [i["item_id"] for i in r.json()["items"]]

        assert items_of(watched) == items_of(not_watched)
        (code,) = unused_code(indexed, 3)[:1]
        new_item(indexed, item, code, ["Drama"], 2001)
        deadline = time.monotonic() + 30
        live = 0
        while time.monotonic() < deadline:
            items_of(watched)  # the engine applies what its feed thread accepted before each batch
            text = server.get("/metrics").text
            match = re.search(rf'ugt_serving_live_items{{domain="{DOMAIN}",state="following",'
                              rf'version="{indexed.version}"}} (\S+)', text)
            live = float(match.group(1)) if match else 0
            if live >= 1:
                break
            time.sleep(0.1)
        assert live == 1, text
        assert re.search(rf'ugt_serving_live_item_delay_seconds_count{{domain="{DOMAIN}"}} 1.0', text), text
        assert items_of(watched) != items_of(not_watched)
    finally:
        server.stop()


def test_the_feed_thread_survives_a_redis_restart_and_resumes_where_it_stopped(checkpoint: Path, tmp_path):
    """A private Redis (append-only file) holds the index and the feed; stopped while the generator follows it,
    the generator keeps answering, counts the failed reads, and after the restart serves the next new item
    without reading the first one again."""
    from tests.integration.test_serving_robust import PrivateRedis

    own = PrivateRedis(tmp_path)
    own.start()
    try:
        index = Index(own.client, f"itest-live-{uuid.uuid4().hex[:8]}")
        _, _, _, ckpt = load_checkpoint(checkpoint)
        RedisSidIndex(own.client, index.version).write(
            (item, code_string(ckpt["semantic_codes"][i])) for item, i in ckpt["vocab"].items())
        gen = UGTGenerator(checkpoint, clock=lambda: BASE_MS / 1000 + 3600, live_items=4, sid_version=index.version,
                           redis_factory=lambda: redis.Redis(port=own.port, socket_timeout=5,
                                                             socket_connect_timeout=1))
        gen.start_background()
        state = view("u1", HISTORY)

        def served_within(n: int, seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while gen.live.stats.items < n and time.monotonic() < deadline:
                gen.recommend_batch([GenerationRequest(state, 5, frozenset(), DOMAIN)])
                time.sleep(0.02)
            return gen.live.stats.items >= n

        first, second = unused_code(index, 2)
        new_item(index, f"live-r1-{RUN}", first, ["Drama"], 1995)
        assert served_within(1, 30), gen.live.stats
        own.stop()
        deadline = time.monotonic() + 30
        while gen.live.stats.feed_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gen.live.stats.feed_errors > 0
        (answer,) = gen.recommend_batch([GenerationRequest(state, 5, frozenset(), DOMAIN)])
        assert len(answer) == 5  # the model does not need the feed to answer
        own.start()  # same port and data: the index and the feed are back
        new_item(index, f"live-r2-{RUN}", second, ["Comedy"], 1996)
        assert served_within(2, 30), gen.live.stats
        assert "known" not in gen.live.stats.rejected  # it went on after the last entry it had read
        print(f"\nfeed reads failed {gen.live.stats.feed_errors} times while Redis was down; resumed after restart")
        gen.live.stop()
    finally:
        own.stop()
