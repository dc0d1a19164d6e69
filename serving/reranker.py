"""The last step before the response: business rules over the generator's candidates.

FilterReranker only keeps the contract every answer must keep (nothing seen or excluded, no duplicates, at
most k); RuleReranker adds the domain's business rules and MMR diversity over item categories. Either may carry a
:class:`FreshExplorer` (``fresh_slots`` > 0): a bounded exploration share for live items (added after training)
that the generator scored into the candidate pool but the answer left out.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence, Set
from typing import Protocol, runtime_checkable

from serving.config import RerankConfig
from serving.generator import ScoredItem


@runtime_checkable
class Reranker(Protocol):
    name: str

    def rerank(self, candidates: Iterable[ScoredItem], k: int, exclude: Set[str]) -> list[ScoredItem]:
        """At most ``k`` items, none in ``exclude``, each item once."""
        ...


class FreshExplorer:
    """Puts up to ``slots`` fresh items from the candidate pool into an answer that lacks them, in a share
    ``rate`` of answers.

    Why: a live item's score starts from its content and its few stream events (docs/RESULTS.md, cold start), so
    it often ranks just below the cut and never gets the events that would lift it. Bounded: at most ``slots`` and
    at most ``k // 2`` slots hold fresh items (those already in the answer on their own score count), only items
    the generator put in its ``k * pool`` candidates qualify (best-scored first), and the answer's lowest non-fresh
    items make room. Deterministic: whether an answer explores and where the items go are drawn from a hash of
    the request's ``key`` (user and state), so the same request gets the same answer.
    """

    def __init__(self, slots: int, rate: float = 1.0):
        if slots < 0 or not 0.0 <= rate <= 1.0:
            raise ValueError(f"fresh_slots must be >= 0 and fresh_rate in [0, 1], got {slots} and {rate}")
        self.slots, self.rate = slots, rate

    def explore(self, picked: Sequence[ScoredItem], candidates: Sequence[ScoredItem], k: int, exclude: Set[str],
                fresh: Set[str], key: str) -> tuple[list[ScoredItem], int]:
        """The answer with fresh items placed in it, and how many were placed."""
        slots = min(self.slots, k // 2)
        if slots <= 0 or not fresh:
            return list(picked), 0
        rng = random.Random(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))
        if rng.random() >= self.rate:
            return list(picked), 0
        taken = {item.item_id for item in picked}
        want = slots - len(taken & fresh)
        extra: list[ScoredItem] = []
        for item in candidates:
            if len(extra) >= want:
                break
            if item.item_id in fresh and item.item_id not in taken and item.item_id not in exclude:
                extra.append(item)
                taken.add(item.item_id)
        if not extra:
            return list(picked), 0
        kept = list(picked)
        while len(kept) > k - len(extra):  # drop the lowest-placed non-fresh item (fresh ones are <= k // 2)
            kept.pop(max(i for i, item in enumerate(kept) if item.item_id not in fresh))
        n = len(kept) + len(extra)
        at = set(rng.sample(range(n), len(extra)))
        placed, rest = iter(extra), iter(kept)
        return [next(placed) if p in at else next(rest) for p in range(n)], len(extra)


class FilterReranker:
    """Drop seen / excluded items and duplicates (first occurrence wins), keep the generator's order, cut to k.

    ``pool`` > 1 (only with a ``fresh`` explorer) asks the generator for ``k * pool`` candidates to explore in."""

    name = "filter"

    def __init__(self, pool: int = 1, fresh: FreshExplorer | None = None):
        self.pool, self.fresh = pool, fresh

    def allowed(self, candidates: Sequence[ScoredItem]) -> list[ScoredItem]:
        """The candidates an exploration may place (no rule here)."""
        return list(candidates)

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
        self.fresh = FreshExplorer(rules.fresh_slots, rules.fresh_rate) if rules.fresh_slots else None

    def allowed(self, candidates: Sequence[ScoredItem]) -> list[ScoredItem]:
        """The candidates an exploration may place: none in ``drop_categories`` (caps and diversity do not apply)."""
        if not self.drop or not candidates:
            return list(candidates)
        cats = self.catalog.categories(item.item_id for item in candidates)
        return [item for item in candidates if not frozenset(cats.get(item.item_id, ())) & self.drop]

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
