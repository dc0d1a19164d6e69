"""Router, API keys, rate limit, context, state version, timeouts and dynamic batching through the app (fakes)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view

from serving.app import create_app
from serving.config import ConfigError, DomainConfig, ServingConfig, build_config
from serving.fallback import PopularityFallback, PopularityGenerator
from serving.generator import GenerationRequest, NoModelAnswer, ScoredItem
from serving.reranker import FilterReranker
from serving.service import Components

POPULAR = {
    "ugt:popularity:movie": {f"m{i}": 100 - i for i in range(1, 21)},
    "ugt:popularity:book": {f"b{i}": 10 - i for i in range(1, 6)},
}


class FixedGenerator:
    """Answers every user with the same list; records batch sizes when called batched."""

    def __init__(self, name: str, items: list[str], delay_s: float = 0.0):
        self.name, self.version = name, "v9"
        self.items = items
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def recommend(self, state, k, exclude, *, domain):
        time.sleep(self.delay_s)
        if state.user_id == "nomodel":
            raise NoModelAnswer("no_known_items", "test")
        return [ScoredItem(i, 1.0) for i in self.items if i not in exclude][:k]

    def recommend_batch(self, requests: list[GenerationRequest]):
        with self.lock:
            self.batches.append(len(requests))
        time.sleep(self.delay_s)
        out = []
        for r in requests:
            if r.state.user_id == "nomodel":
                out.append(NoModelAnswer("no_known_items", "test"))
            else:
                out.append([ScoredItem(i, 1.0) for i in self.items if i not in r.exclude][: r.k])
        return out


def app_for(config: ServingConfig, generators=None, reader=None, generator=None):
    redis = FakeZsetRedis(POPULAR)
    fallback = PopularityFallback(redis, clock=FakeClock())
    states = {u: view(u, ["m1"]) for u in ("u1", "u2", "nomodel")}
    parts = Components(
        state_reader=reader or FakeStateReader(states),
        generator=generator or PopularityGenerator(fallback),
        fallback=fallback,
        reranker=FilterReranker(),
        generators=generators or {},
    )
    return create_app(config=config, components=parts, client=redis)


ROUTED = ServingConfig(
    domains=(DomainConfig("movie"), DomainConfig("book")), default_domain="movie"
)


def test_domain_selects_the_model_and_unknown_domain_is_422():
    movie, book = FixedGenerator("movie-model", ["m5", "m6"]), FixedGenerator("book-model", ["b3", "b1"])
    client = TestClient(app_for(ROUTED, generators={"movie": movie, "book": book}))
    body = client.post("/recommend", json={"user_id": "u1", "k": 2}).json()
    assert body["model"] == "movie-model-v9" and [i["item_id"] for i in body["items"]] == ["m5", "m6"]
    body = client.post("/recommend", json={"user_id": "u1", "k": 2, "domain": "book"}).json()
    assert body["model"] == "book-model-v9" and [i["item_id"] for i in body["items"]] == ["b3", "b1"]
    r = client.post("/recommend", json={"user_id": "u1", "k": 2, "domain": "video"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "domain"
    assert "'video' is not served" in r.json()["message"] and "book" in r.json()["message"]
    assert 'ugt_serving_errors_total{kind="invalid_request"} 1.0' in client.get("/metrics").text


def test_router_config_from_yaml_mapping(tmp_path):
    config = build_config(
        {
            "default_domain": "movie",
            "domains": {
                "movie": {"rerank": {"diversity": 0.3, "caps": {"Comedy": 2}}},
                "article": {"generator": "popularity", "generator_version": "v2"},
            },
        },
        env={},
        base_dir=tmp_path,
    )
    routes = {d.name: d for d in config.domains}
    assert routes["movie"].rerank.diversity == 0.3 and routes["movie"].rerank.caps == (("Comedy", 2),)
    assert routes["article"].generator_version == "v2" and not routes["article"].rerank.active
    with pytest.raises(ConfigError) as err:
        build_config(
            {"default_domain": "news", "domains": {"movie": {"generater": "ugt", "rerank": {"diversity": 2}}}},
            env={},
            base_dir=tmp_path,
        )
    text = str(err.value)
    assert "domains.movie.generater: unknown key" in text
    assert "domains.movie.rerank.diversity: Input should be less than 1, got 2" in text
    # checks across keys run once every key is valid on its own
    with pytest.raises(ConfigError, match=r"default_domain: 'news' is not one of domains \['movie'\]"):
        build_config({"default_domain": "news", "domains": {"movie": {}}}, env={}, base_dir=tmp_path)


def test_api_keys_401_and_env_override(tmp_path):
    config = ServingConfig(api_keys=("secret-key-1",))
    client = TestClient(app_for(config))
    r = client.post("/recommend", json={"user_id": "u1", "k": 1})
    assert r.status_code == 401 and "missing" in r.json()["message"]
    r = client.post("/recommend", json={"user_id": "u1", "k": 1}, headers={"X-API-Key": "nope-nope-nope"})
    assert r.status_code == 401 and "unknown" in r.json()["message"]
    r = client.post("/recommend", json={"user_id": "u1", "k": 1}, headers={"X-API-Key": "secret-key-1"})
    assert r.status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key
    env = {"UGT_SERVING_API_KEYS": "aaaaaaaa1, bbbbbbbb2"}
    assert build_config({}, env=env, base_dir=tmp_path).api_keys == ("aaaaaaaa1", "bbbbbbbb2")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        build_config({"api_keys": ["short"]}, env={}, base_dir=tmp_path)


def test_rate_limit_is_429_with_retry_after_per_key():
    config = ServingConfig(api_keys=("key-aaaaaaa", "key-bbbbbbb"), rate_limit_rps=0.01, rate_limit_burst=2)
    client = TestClient(app_for(config))
    a, b = {"X-API-Key": "key-aaaaaaa"}, {"X-API-Key": "key-bbbbbbb"}
    codes = [client.post("/recommend", json={"user_id": "u1", "k": 1}, headers=a).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = client.post("/recommend", json={"user_id": "u1", "k": 1}, headers=a)
    assert r.status_code == 429 and 90 <= int(r.headers["Retry-After"]) <= 100  # ~1 token / 0.01 per s
    assert "0.01 requests/s" in r.json()["message"]
    assert client.post("/recommend", json={"user_id": "u1", "k": 1}, headers=b).status_code == 200


def test_context_is_bounded_excluded_and_serves_an_unknown_user():
    client = TestClient(app_for(replace(ServingConfig(), max_context=3)))
    r = client.post("/recommend", json={"user_id": "u1", "k": 1, "context": ["m1", "m2", "m3", "m4"]})
    assert r.status_code == 422 and "context: at most 3 items, got 4" in r.json()["message"]
    body = client.post("/recommend", json={"user_id": "new", "k": 2, "context": ["m1", "m2"]}).json()
    assert body["fallback"] is False  # the session alone is a state
    assert [i["item_id"] for i in body["items"]] == ["m3", "m4"]


def test_state_version_mismatch_is_a_counted_fallback():
    old = replace(view("u1", ["m1", "m2"]), state_version=999)
    client = TestClient(app_for(ServingConfig(), reader=FakeStateReader({"u1": old})))
    body = client.post("/recommend", json={"user_id": "u1", "k": 2}).json()
    assert body["fallback"] is True and body["fallback_reason"] == "state_version_mismatch"
    assert 'ugt_serving_fallbacks_total{reason="state_version_mismatch"} 1.0' in client.get("/metrics").text


def test_a_slow_generator_times_out_into_the_fallback():
    slow = FixedGenerator("slow", ["m9"], delay_s=0.5)
    client = TestClient(app_for(replace(ServingConfig(), request_timeout_ms=50), generator=slow))
    r = client.post("/recommend", json={"user_id": "u1", "k": 2})
    assert r.status_code == 200 and r.json()["fallback_reason"] == "timeout"
    assert [i["item_id"] for i in r.json()["items"]] == ["m1", "m2"]


def test_concurrent_requests_share_a_batch_and_say_so():
    gen = FixedGenerator("batched", ["m7", "m8", "m9"], delay_s=0.05)
    # generous queue/request timeouts: this is about batching; on a loaded CI box a 200 ms queue timeout once sent
    # a request to the overload fallback (the timeouts have their own tests)
    app = app_for(replace(ServingConfig(), batch_max_size=16, batch_max_wait_ms=20, queue_timeout_ms=5000,
                          request_timeout_ms=10000), generator=gen)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            users = ["u1", "u2", "nomodel"] * 4
            return await asyncio.gather(*(http.post("/recommend", json={"user_id": u, "k": 2}) for u in users))

    responses = asyncio.run(main())
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses)
    assert max(b["batch_size"] for b in bodies) > 1 and max(gen.batches) > 1
    for body in bodies:
        if body["user_id"] == "nomodel":  # one user's NoModelAnswer, not the batch's
            assert body["fallback_reason"] == "no_known_items"
        else:
            assert not body["fallback"], body
            assert [i["item_id"] for i in body["items"]] == ["m7", "m8"]
    metrics = asyncio.run(_metrics(app))
    assert "ugt_serving_batch_size_count" in metrics and 'ugt_serving_batch_size_bucket{le="1.0"}' in metrics


async def _metrics(app) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        return (await http.get("/metrics")).text
