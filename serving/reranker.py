"""The last step before the response: business rules over the generator's candidates.

FilterReranker only keeps the contract every answer must keep (nothing seen or excluded, no duplicates, at
most k); RuleReranker adds the domain's business rules and MMR diversity over item categories.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Protocol, runtime_checkable

from serving.config import RerankConfig
from serving.generator import ScoredItem


@runtime_checkable
class Reranker(Protocol):
    name: str

    def rerank(self, candidates: Iterable[ScoredItem], k: int, exclude: Set[str]) -> list[ScoredItem]:
        """At most ``k`` items, none in ``exclude``, each item once."""
        ...


class FilterReranker:
    """Drop seen / excluded items and duplicates (first occurrence wins), keep the generator's order, cut to k."""

    name = "filter"

    def rerank(self, candidates: Iterable[ScoredItem], k: int, exclude: Set[str]) -> list[ScoredItem]:
        out: list[ScoredItem] = []
        taken: set[str] = set()
        if k <= 0:
            return out
        for item in candidates:
            if item.item_id in exclude or item.item_id in taken:
                continue
            taken.add(item.item_id)
            out.append(item)
            if len(out) == k:
                break
        return out


class CategorySource(Protocol):
    def categories(self, item_ids: Iterable[str]) -> dict[str, tuple[str, ...]]: ...


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


class RuleReranker:
    """Business rules and MMR diversity over item categories (serving.config.RerankConfig).

    Drop seen / excluded / duplicate items and items in ``drop_categories``; relevance is the generator's
    score min-max scaled to [0, 1] over the candidates, times each matching category's boost; then items are
    picked greedily by ``(1 - diversity) * relevance - diversity * max Jaccard similarity`` to those already
    picked (MMR), skipping items whose category already holds its cap. Scores in the answer stay the
    generator's; the order is the reranker's.
    """

    name = "rules"

    def __init__(self, rules: RerankConfig, catalog: CategorySource):
        self.rules = rules
        self.catalog = catalog
        self.pool = rules.pool
        self.drop = frozenset(rules.drop_categories)
        self.boosts = dict(rules.boosts)
        self.caps = dict(rules.caps)

    def rerank(self, candidates: Iterable[ScoredItem], k: int, exclude: Set[str]) -> list[ScoredItem]:
        pool = FilterReranker().rerank(candidates, 1_000_000, exclude)
        if k <= 0 or not pool:
            return []
        cats = self.catalog.categories(item.item_id for item in pool)
        items = [(item, frozenset(cats.get(item.item_id, ()))) for item in pool]
        items = [(item, c) for item, c in items if not c & self.drop]
        if not items:
            return []
        low = min(item.score for item, _ in items)
        span = max(item.score for item, _ in items) - low
        relevance = []
        for item, c in items:
            rel = (item.score - low) / span if span > 0 else 1.0
            for cat in c:
                rel *= self.boosts.get(cat, 1.0)
            relevance.append(rel)
        d = self.rules.diversity
        counts: dict[str, int] = {}
        picked: list[int] = []
        left = list(range(len(items)))
        while left and len(picked) < k:
            best, best_value = -1, float("-inf")
            for i in left:
                c = items[i][1]
                if any(counts.get(cat, 0) >= self.caps[cat] for cat in c if cat in self.caps):
                    continue
                sim = max((_jaccard(c, items[j][1]) for j in picked), default=0.0) if d else 0.0
                value = (1.0 - d) * relevance[i] - d * sim
                if value > best_value:
                    best, best_value = i, value
            if best < 0:
                break  # every candidate left is over a cap
            picked.append(best)
            left.remove(best)
            for cat in items[best][1]:
                counts[cat] = counts.get(cat, 0) + 1
        return [items[i][0] for i in picked]
