"""FilterReranker: the response contract (nothing seen or excluded, no duplicates, at most k, order kept)."""

from serving.generator import ScoredItem
from serving.reranker import FilterReranker, Reranker


def items(*ids: str) -> list[ScoredItem]:
    return [ScoredItem(i, float(100 - n)) for n, i in enumerate(ids)]


def test_drops_excluded_and_keeps_order():
    out = FilterReranker().rerank(items("a", "b", "c", "d"), k=10, exclude={"b", "d"})
    assert [i.item_id for i in out] == ["a", "c"]


def test_dedupes_first_occurrence_wins():
    candidates = [ScoredItem("a", 3.0), ScoredItem("b", 2.0), ScoredItem("a", 1.0), ScoredItem("c", 0.5)]
    out = FilterReranker().rerank(candidates, k=10, exclude=set())
    assert out == [ScoredItem("a", 3.0), ScoredItem("b", 2.0), ScoredItem("c", 0.5)]


def test_truncates_to_k_after_filtering():
    out = FilterReranker().rerank(items("a", "b", "c", "d", "e"), k=2, exclude={"a"})
    assert [i.item_id for i in out] == ["b", "c"]


def test_consumes_only_what_it_needs_from_a_generator():
    pulled = []

    def stream():
        for i in items("a", "b", "c", "d"):
            pulled.append(i.item_id)
            yield i

    assert [i.item_id for i in FilterReranker().rerank(stream(), k=2, exclude=set())] == ["a", "b"]
    assert pulled == ["a", "b"]


def test_fewer_candidates_than_k_and_empty():
    assert [i.item_id for i in FilterReranker().rerank(items("a"), k=5, exclude=set())] == ["a"]
    assert FilterReranker().rerank([], k=5, exclude=set()) == []


def test_is_a_reranker():
    assert isinstance(FilterReranker(), Reranker)


# -- RuleReranker: filters, boosts, caps, MMR diversity over categories --------------------------------
from serving.config import RerankConfig  # noqa: E402
from serving.reranker import RuleReranker  # noqa: E402

CATS = {
    "a1": ("Action",),
    "a2": ("Action",),
    "a3": ("Action", "Thriller"),
    "c1": ("Comedy",),
    "c2": ("Comedy", "Romance"),
    "h1": ("Horror",),
}


class FakeCatalog:
    def __init__(self) -> None:
        self.calls = 0

    def categories(self, item_ids):
        self.calls += 1
        return {i: CATS.get(i, ()) for i in item_ids}


RANKED = [ScoredItem(i, s) for i, s in [("a1", 9), ("a2", 8), ("a3", 7), ("h1", 6), ("c1", 5), ("c2", 4)]]


def rule_ids(rules: RerankConfig, k: int = 4, exclude=frozenset()) -> list[str]:
    return [i.item_id for i in RuleReranker(rules, FakeCatalog()).rerank(RANKED, k, exclude)]


def test_no_rules_keep_the_generator_order():
    assert rule_ids(RerankConfig()) == ["a1", "a2", "a3", "h1"]


def test_drop_categories_filters_and_exclude_still_holds():
    assert rule_ids(RerankConfig(drop_categories=("Horror",)), exclude={"a2"}) == ["a1", "a3", "c1", "c2"]


def test_caps_per_category():
    assert rule_ids(RerankConfig(caps=(("Action", 1),))) == ["a1", "h1", "c1", "c2"]


def test_boosts_lift_a_category():
    # relevance scaled to [0, 1]: c1 = 0.2 -> x5 = 1.0 ties a1 = 1.0 (first kept), ahead of a2 = 0.8
    assert rule_ids(RerankConfig(boosts=(("Comedy", 5.0),)), k=3) == ["a1", "c1", "a2"]


def test_diversity_interleaves_categories():
    plain = rule_ids(RerankConfig(), k=3)
    diverse = rule_ids(RerankConfig(diversity=0.5), k=3)
    assert plain == ["a1", "a2", "a3"]
    assert diverse[0] == "a1" and len({CATS[i][0] for i in diverse}) == 3
    # answers keep the generator's scores
    out = RuleReranker(RerankConfig(diversity=0.5), FakeCatalog()).rerank(RANKED, 3, frozenset())
    assert {i.item_id: i.score for i in out} == {i.item_id: i.score for i in RANKED if i.item_id in diverse}


def test_unknown_categories_match_no_rule_and_everything_capped_gives_fewer():
    items = [ScoredItem("x", 1.0), ScoredItem("a1", 0.5)]
    out = RuleReranker(RerankConfig(caps=(("Action", 0),)), FakeCatalog()).rerank(items, 5, frozenset())
    assert [i.item_id for i in out] == ["x"]
