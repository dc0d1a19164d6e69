"""The last step before the response: business rules over the generator's candidates.

The walking skeleton's reranker only guarantees the contract every answer must keep (nothing seen or
excluded, no duplicates, at most k); the diversity reranker comes later behind the same :class:`Reranker`.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Protocol, runtime_checkable

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
