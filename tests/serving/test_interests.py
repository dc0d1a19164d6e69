"""Declared interests (serving/interests.py): popularity within them for a user without state, the bounded boost of
a short history's candidates, 422 on unknown names; through the app with fakes and with the tiny trained UGT."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view

from serving.app import create_app
from serving.config import ServingConfig
from serving.fallback import PopularityFallback, PopularityGenerator
from serving.generator import ScoredItem
from serving.interests import InterestRanker, boosted
from serving.reranker import FilterReranker
from serving.service import Components

# m1..m20 by popularity; every third item is a Comedy, m5 and m10 are Sci-Fi
POPULAR = {"ugt:popularity:movie": {f"m{i}": 100 - i for i in range(1, 21)}}
GENRES = {f"m{i}": ("Comedy",) if i % 3 == 0 else ("Drama",) for i in range(1, 21)} | {
    "m5": ("Sci-Fi",), "m10": ("Sci-Fi", "Drama")}


class DictCatalog:
    def __init__(self, genres: dict[str, tuple[str, ...]]):
        self.genres = genres
        self.calls = 0

    def categories(self, item_ids):
        self.calls += 1
        return {item: self.genres.get(item, ()) for item in item_ids}


def ranker(genres=GENRES, **kwargs) -> InterestRanker:
    fallback = PopularityFallback(FakeZsetRedis(POPULAR), clock=FakeClock())
    return InterestRanker(fallback, DictCatalog(genres), clock=FakeClock(), **kwargs)


def test_popular_in_keeps_popularity_order_within_the_interests_and_pads_with_the_rest():
    r = ranker()
    assert [s.item_id for s in r.popular_in("movie", ["Comedy"], 3, frozenset({"m6"}))] == ["m3", "m9", "m12"]
    within = [s.item_id for s in r.popular_in("movie", ["Sci-Fi"], 4, frozenset({"m1"}))]
    assert within == ["m5", "m10", "m2", "m3"]  # two Sci-Fi, then overall popularity without the excluded m1


def test_unknown_names_list_the_known_ones_and_known_is_cached():
    r = ranker()
    assert r.unknown("movie", ["Comedy", "Sci-Fi"]) is None
    message = r.unknown("movie", ["Comedy", "Horror", "Western"])
    assert message is not None
    assert "['Horror', 'Western']" in message and "['Comedy', 'Drama', 'Sci-Fi']" in message
    calls = r.catalog.calls  # type: ignore[attr-defined]
    r.unknown("movie", ["Drama"])
    assert r.catalog.calls == calls  # type: ignore[attr-defined]
    empty = ranker(genres={})
    assert "none yet" in (empty.unknown("movie", ["Comedy"]) or "")
    empty.unknown("movie", ["Comedy"])
    assert empty.catalog.calls == 1  # type: ignore[attr-defined]  # "nothing known" is cached too, briefly


def test_the_boost_is_bounded_and_keeps_the_models_scores():
    candidates = [ScoredItem("a", 10.0), ScoredItem("b", 9.0), ScoredItem("c", 8.5), ScoredItem("d", 0.0)]
    cats = {"c": ("Comedy",), "d": ("Comedy",)}
    out = boosted(candidates, frozenset({"Comedy"}), cats, 0.25)
    # c (scaled 0.85) passes a (1.0) and b (0.9); d (scaled 0.0) stays last: it is more than 0.25 below
    assert out == [ScoredItem("c", 8.5), ScoredItem("a", 10.0), ScoredItem("b", 9.0), ScoredItem("d", 0.0)]
    assert boosted(candidates, frozenset(), cats, 0.25) == candidates


def test_shaped_only_below_max_events():
    r = ranker(max_events=3)
    candidates = [ScoredItem("m1", 3.0), ScoredItem("m2", 2.95), ScoredItem("m3", 2.9), ScoredItem("m4", 1.0)]
    assert r.shaped(candidates, ["Comedy"], 2)[0].item_id == "m3"
    assert r.shaped(candidates, ["Comedy"], 3) == candidates
    with pytest.raises(ValueError, match="boost"):
        ranker(boost=2.0)


def client_for(generator=None, interests: bool = True, states=None, **config) -> TestClient:
    redis = FakeZsetRedis(POPULAR)
    fallback = PopularityFallback(redis, clock=FakeClock())
    parts = Components(
        state_reader=FakeStateReader(states or {"u1": view("u1", ["m1", "m2"])}),
        generator=generator or PopularityGenerator(fallback),
        fallback=fallback,
        reranker=FilterReranker(),
        interests=InterestRanker(fallback, DictCatalog(GENRES), clock=FakeClock()) if interests else None,
    )
    return TestClient(create_app(config=ServingConfig(**config), components=parts, client=redis))


def ids(body) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def test_a_new_user_with_interests_gets_popularity_within_them():
    client = client_for()
    plain = client.post("/recommend", json={"user_id": "new", "k": 3}).json()
    assert ids(plain) == ["m1", "m2", "m3"] and plain["model"] == "popularity-fallback-v1"
    body = client.post("/recommend", json={"user_id": "new", "k": 3, "interests": ["Comedy"]}).json()
    assert ids(body) == ["m3", "m6", "m9"]
    assert body["fallback"] is True and body["fallback_reason"] == "unknown_user"
    assert body["model"] == "popularity-fallback-v1+interests"
    assert set(body) == set(plain)  # the answer's shape does not change
    assert 'ugt_serving_interest_answers_total{how="popular"} 1.0' in client.get("/metrics").text


def test_interests_travel_to_the_engine_process():
    with client_for(engine="process") as client:  # the request is rebuilt in the forked engine
        body = client.post("/recommend", json={"user_id": "new", "k": 2, "interests": ["Sci-Fi"]}).json()
        assert ids(body) == ["m5", "m10"] and body["model"] == "popularity-fallback-v1+interests"
        r = client.post("/recommend", json={"user_id": "new", "interests": ["Horror"]})
        assert r.status_code == 422 and "known: ['Comedy', 'Drama', 'Sci-Fi']" in r.json()["message"]


def test_unknown_interests_are_422_listing_the_known_ones():
    r = client_for().post("/recommend", json={"user_id": "new", "interests": ["Comedy", "Horror"]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "interests"
    assert "['Horror']" in r.json()["message"] and "['Comedy', 'Drama', 'Sci-Fi']" in r.json()["message"]
    r = client_for(interests=False).post("/recommend", json={"user_id": "new", "interests": ["Comedy"]})
    assert r.status_code == 422 and "not served" in r.json()["message"]
    r = client_for().post("/recommend", json={"user_id": "new", "interests": []})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "interests"


def test_a_short_history_is_boosted_toward_the_interests_and_a_long_one_is_not(trained: Path):
    from serving.ugt_generator import UGTGenerator

    generator = UGTGenerator(trained)
    items = list(generator.item_to_index)
    genres = {item: ("Even",) if int(item) % 2 == 0 else ("Odd",) for item in items}
    popular = {"ugt:popularity:movie": {item: float(len(items) - i) for i, item in enumerate(items[:200])}}
    redis = FakeZsetRedis(popular)
    fallback = PopularityFallback(redis, clock=FakeClock())
    states = {"short": view("short", items[:2]), "long": view("long", items[:6])}
    parts = Components(state_reader=FakeStateReader(states), generator=generator, fallback=fallback,
                       reranker=FilterReranker(), interests=InterestRanker(fallback, DictCatalog(genres)))
    client = TestClient(create_app(config=ServingConfig(), components=parts, client=redis))
    plain = client.post("/recommend", json={"user_id": "short", "k": 10}).json()
    body = client.post("/recommend", json={"user_id": "short", "k": 10, "interests": ["Even"]}).json()
    assert body["fallback"] is False and body["model"] == plain["model"] + "+interests"
    even = sum(int(item) % 2 == 0 for item in ids(body))
    assert even >= sum(int(item) % 2 == 0 for item in ids(plain))
    scores = {i["item_id"]: i["score"] for i in plain["items"]}
    assert all(i["score"] == scores[i["item_id"]] for i in body["items"] if i["item_id"] in scores)
    long_plain = client.post("/recommend", json={"user_id": "long", "k": 10}).json()
    long_body = client.post("/recommend", json={"user_id": "long", "k": 10, "interests": ["Even"]}).json()
    assert ids(long_body) == ids(long_plain) and long_body["model"] == long_plain["model"]
    assert 'ugt_serving_interest_answers_total{how="boosted"} 1.0' in client.get("/metrics").text
