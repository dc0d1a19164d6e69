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
