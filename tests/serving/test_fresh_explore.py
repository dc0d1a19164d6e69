"""Fresh-item exploration (rerank keys fresh_slots / fresh_rate; serving/reranker.py FreshExplorer): the bound, the
pool it draws from, determinism, and through the app (fakes) the answers and their /metrics counters."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view

from serving.app import create_app
from serving.config import ConfigError, RerankConfig, ServingConfig, build_config
from serving.fallback import PopularityFallback
from serving.generator import GenerationRequest, ScoredItem
from serving.reranker import FilterReranker, FreshExplorer, RuleReranker
from serving.service import Components

TRAINED = [f"t{i}" for i in range(1, 31)]
LIVE = ["new1", "new2", "new3"]


def scored(ids: list[str]) -> list[ScoredItem]:
    return [ScoredItem(i, float(100 - n)) for n, i in enumerate(ids)]


def ids(items: list[ScoredItem]) -> list[str]:
    return [i.item_id for i in items]


def test_at_most_slots_and_half_of_k_go_to_fresh_items_from_the_pool_best_first():
    pool = scored([*TRAINED[:10], "new1", *TRAINED[10:20], "new2", "new3"])
    picked = pool[:10]
    out, placed = FreshExplorer(2).explore(picked, pool, 10, set(), set(LIVE), "u1|1")
    assert placed == 2 and len(out) == 10
    assert set(ids(out)) == set(TRAINED[:8]) | {"new1", "new2"}  # the two lowest trained items made room
    assert [i for i in ids(out) if i in TRAINED] == TRAINED[:8]  # the rest keep their order
    out, placed = FreshExplorer(10).explore(picked, pool, 4, set(), set(LIVE), "u1|1")
    assert placed == 2 and sum(i in LIVE for i in ids(out)) == 2  # k // 2 bounds it
    assert FreshExplorer(3).explore(picked[:1], pool, 1, set(), set(LIVE), "u1|1") == (picked[:1], 0)  # k 1: none


def test_fresh_items_already_answered_count_and_excluded_or_absent_ones_never_come():
    pool = scored(["new1", *TRAINED[:10], "new2", "new3"])
    out, placed = FreshExplorer(2).explore(pool[:6], pool, 6, set(), set(LIVE), "u1|1")
    assert placed == 1 and sum(i in LIVE for i in ids(out)) == 2  # new1 on its score, one explored
    out, placed = FreshExplorer(2).explore(pool[:6], pool, 6, {"new2", "new3"}, set(LIVE), "u1|1")
    assert placed == 0 and ids(out) == ids(pool[:6])
    no_fresh = scored(TRAINED[:12])
    assert FreshExplorer(2).explore(no_fresh[:6], no_fresh, 6, set(), set(LIVE), "u1|1") == (no_fresh[:6], 0)


def test_the_draw_is_the_requests_own_and_the_rate_is_the_share_that_explores():
    pool = scored([*TRAINED[:10], *LIVE])
    explorer = FreshExplorer(1, rate=0.3)
    runs = [explorer.explore(pool[:10], pool, 10, set(), set(LIVE), f"u{u}|5") for u in range(400)]
    again = [explorer.explore(pool[:10], pool, 10, set(), set(LIVE), f"u{u}|5") for u in range(400)]
    assert runs == again  # same user and state: same answer
    share = sum(placed for _, placed in runs) / len(runs)
    assert 0.2 < share < 0.4
    positions = {ids(out).index("new1") for out, placed in runs if placed}
    assert len(positions) > 5  # placed anywhere in the answer, not always last
    assert FreshExplorer(1, rate=0.0).explore(pool[:10], pool, 10, set(), set(LIVE), "u1|1")[1] == 0
    with pytest.raises(ValueError, match="fresh_rate"):
        FreshExplorer(1, rate=1.5)


def test_a_rule_reranker_explores_only_items_its_filters_allow():
    class Catalog:
        def categories(self, item_ids):
            return {"new1": ("Horror",), "new2": ("Drama",)}

    reranker = RuleReranker(RerankConfig(drop_categories=("Horror",), fresh_slots=2), Catalog())
    assert reranker.fresh is not None and reranker.fresh.slots == 2
    assert ids(reranker.allowed(scored(["new1", "new2"]))) == ["new2"]


def test_the_rerank_keys_are_bounded():
    for bad in ({"fresh_slots": 11}, {"fresh_slots": -1}, {"fresh_rate": 1.2}):
        with pytest.raises(ConfigError, match="fresh_"):
            build_config({"rerank": bad}, env={})


class LiveGenerator:
    """Scores the trained items above the live ones; knows which ids are live (as UGTGenerator.fresh_items)."""

    name, version = "fake-ugt", "v1"

    def fresh_items(self, item_ids):
        return {i for i in item_ids if i in LIVE}

    def recommend_batch(self, requests: list[GenerationRequest]):
        return [[i for i in scored([*TRAINED, *LIVE]) if i.item_id not in r.exclude][: r.k] for r in requests]


def app_with(rerank: dict) -> TestClient:
    redis = FakeZsetRedis({"ugt:popularity:movie": {"t1": 1.0}})
    config = build_config({"default_domain": "movie", "rerank": rerank}, env={})
    fresh = FreshExplorer(config.rerank.fresh_slots, config.rerank.fresh_rate) if config.rerank.fresh_slots else None
    parts = Components(state_reader=FakeStateReader({f"u{n}": view(f"u{n}", ["t1"]) for n in range(20)}),
                       generator=LiveGenerator(), fallback=PopularityFallback(redis, clock=FakeClock()),
                       reranker=FilterReranker(config.rerank.pool if fresh else 1, fresh))
    return TestClient(create_app(config=config, components=parts, client=redis))


def counters(client: TestClient) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_through_the_app_fresh_items_appear_within_the_bound_and_are_counted():
    with app_with({"fresh_slots": 1, "pool": 2}) as client:  # candidates: top 20 of 33; the live items are 31st+
        bodies = [client.post("/recommend", json={"user_id": f"u{n}", "k": 10}).json() for n in range(20)]
        assert all(not b["fallback"] and len(b["items"]) == 10 for b in bodies)
        assert all(sum(i["item_id"] in LIVE for i in b["items"]) == 0 for b in bodies)  # not in the pool: none
    with app_with({"fresh_slots": 1, "pool": 4}) as client:  # now they are candidates
        bodies = [client.post("/recommend", json={"user_id": f"u{n}", "k": 10}).json() for n in range(20)]
        fresh = [[i["item_id"] for i in b["items"] if i["item_id"] in LIVE] for b in bodies]
        assert all(f == ["new1"] for f in fresh)  # one slot, the best-scored live item
        again = client.post("/recommend", json={"user_id": "u3", "k": 10}).json()
        assert again["items"] == bodies[3]["items"]  # the same request, the same answer
        got = counters(client)
        assert got[("ugt_serving_fresh_answers_total", (("how", "explored"),))] == 21
        assert got[("ugt_serving_fresh_explored_items_total", ())] == 21
    with app_with({}) as client:  # off by default
        body = client.post("/recommend", json={"user_id": "u1", "k": 10}).json()
        assert not set(i["item_id"] for i in body["items"]) & set(LIVE)
        assert counters(client)[("ugt_serving_fresh_answers_total", (("how", "explored"),))] == 0


def test_serving_config_default_is_off():
    assert ServingConfig().rerank.fresh_slots == 0


def test_compose_gives_a_rule_free_domain_the_pool_and_the_explorer():
    from serving.compose import _rerankers

    config = build_config({"default_domain": "movie", "rerank": {"fresh_slots": 2, "fresh_rate": 0.5}}, env={})
    (reranker,) = _rerankers(config, None, None).values()  # type: ignore[arg-type]  (no rule: no catalog read)
    assert isinstance(reranker, FilterReranker) and reranker.pool == 3
    assert (reranker.fresh.slots, reranker.fresh.rate) == (2, 0.5)
    (plain,) = _rerankers(build_config({"default_domain": "movie"}, env={}), None, None).values()  # type: ignore[arg-type]
    assert plain.pool == 1 and plain.fresh is None
