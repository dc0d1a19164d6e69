"""Declared interests: the onboarding answer a /recommend request may carry (``interests: ["Comedy", ...]``).

A user with no events has nothing for the model to read; one with a few events has little. What the user said
they like (item categories the catalog already knows, e.g. ML genres) shapes those answers only:

- no state (the popularity fallback answers): popularity within the declared categories, padded with overall
  popularity when they hold fewer than the answer needs;
- a short history (fewer than ``max_events`` events): a bounded boost of the model's ``k * pool`` candidates
  in those categories: scores min-max scaled to [0, 1] over the candidates, ``boost`` added to matching items, then
  re-sorted, so a matching item overtakes only items within ``boost`` of it (scores in the answer stay the
  model's). From ``max_events`` events on the user's own history decides alone.

The known categories are those of the domain's popular items (its popularity list, read from Feast's
item_metadata view through :class:`serving.items.ItemCatalog`), cached for ``ttl_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence, Set
from typing import Protocol

from serving.fallback import PopularityFallback
from serving.generator import ScoredItem

DEFAULT_MAX_EVENTS = 5  # the "first session": the bench's new users are measured up to their 5th event
DEFAULT_BOOST = 0.25  # in units of the candidates' min-max scaled score
EMPTY_TTL_S = 10.0  # how long "no category known" is kept for a domain
DEFAULT_POOL = 5  # the model is asked for k * pool candidates when a request names interests (room for the boost)


class CategorySource(Protocol):
    def categories(self, item_ids: Iterable[str]) -> dict[str, tuple[str, ...]]: ...


def boosted(candidates: Sequence[ScoredItem], liked: Set[str], categories: dict[str, tuple[str, ...]],
            boost: float) -> list[ScoredItem]:
    """The candidates re-sorted by scaled score plus ``boost`` for items in a ``liked`` category (stable)."""
    if not candidates or not liked:
        return list(candidates)
    low = min(c.score for c in candidates)
    span = max(c.score for c in candidates) - low

    def value(pair: tuple[int, ScoredItem]) -> tuple[float, int]:
        i, item = pair
        scaled = (item.score - low) / span if span > 0 else 1.0
        hit = any(cat in liked for cat in categories.get(item.item_id, ()))
        return -(scaled + (boost if hit else 0.0)), i

    return [item for _, item in sorted(enumerate(candidates), key=value)]


class InterestRanker:
    """Known categories per domain, popularity within declared categories, and the short-history boost."""

    def __init__(self, popularity: PopularityFallback, catalog: CategorySource, *,
                 max_events: int = DEFAULT_MAX_EVENTS, boost: float = DEFAULT_BOOST, pool: int = DEFAULT_POOL,
                 ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_events < 0 or not 0.0 <= boost <= 1.0:
            raise ValueError(f"interests: max_events must be >= 0 and boost in [0, 1], got {max_events}, {boost}")
        self.popularity, self.catalog = popularity, catalog
        self.max_events, self.boost, self.pool, self.ttl_s, self.clock = max_events, boost, max(1, pool), ttl_s, clock
        self._known: dict[str, tuple[frozenset[str], float]] = {}

    def known(self, domain: str) -> frozenset[str]:
        """The categories of the domain's popular items (empty when neither popularity nor metadata is there)."""
        now = self.clock()
        hit = self._known.get(domain)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            ranked, _ = self.popularity.ranking(domain)
        except Exception:  # no popularity (NoPopularity) yet: nothing known
            ranked = ()
        cats = self.catalog.categories(item.item_id for item in ranked)
        known = frozenset(cat for item_cats in cats.values() for cat in item_cats)
        # nothing known is asked again sooner, but not per request (this runs on the HTTP event loop)
        self._known[domain] = (known, now + (self.ttl_s if known else min(self.ttl_s, EMPTY_TTL_S)))
        return known

    def unknown(self, domain: str, interests: Sequence[str]) -> str | None:
        """A message naming the interests the domain does not know and listing those it knows; None when all known."""
        known = self.known(domain)
        unknown = sorted({name for name in interests if name not in known})
        if not unknown:
            return None
        listed = sorted(known) if known else "none yet (no item metadata for this domain's popular items)"
        return f"unknown interests {unknown} for domain {domain!r}; known: {listed}"

    def popular_in(self, domain: str, interests: Sequence[str], k: int, exclude: Set[str]) -> list[ScoredItem]:
        """The domain's most popular items in any of ``interests``, then the rest by popularity; raises
        NoPopularity as the fallback does."""
        everything, source = self.popularity.ranking(domain)
        if self.popularity.observer is not None:
            self.popularity.observer(source)
        ranked = [item for item in everything if item.item_id not in exclude]
        cats = self.catalog.categories(item.item_id for item in ranked)
        liked = frozenset(interests)
        inside = [item for item in ranked if liked.intersection(cats.get(item.item_id, ()))]
        if len(inside) >= k:
            return inside[:k]
        taken = {item.item_id for item in inside}
        return inside + [item for item in ranked if item.item_id not in taken][: k - len(inside)]

    def shaped(self, candidates: Sequence[ScoredItem], interests: Sequence[str], events: int) -> list[ScoredItem]:
        """The model's candidates boosted toward ``interests`` for a short history; unchanged from max_events on."""
        if events >= self.max_events or not interests or not candidates:
            return list(candidates)
        cats = self.catalog.categories(item.item_id for item in candidates)
        return boosted(candidates, frozenset(interests), cats, self.boost)
