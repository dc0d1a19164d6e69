"""The generator interface: user state in, scored candidate items out.

The HTTP layer only knows :class:`Generator`, so the walking-skeleton popularity model and the later UGT
generator (beam search over semantic IDs on a GPU) are interchangeable through config (`generator:`).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from serving.state import UserStateView

if TYPE_CHECKING:
    from serving.fallback import PopularityFallback


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    score: float


class NoModelAnswer(Exception):
    """The generator cannot answer this user (e.g. no history item it knows); ``reason`` names why.

    The service answers with the popularity fallback and reports ``reason`` as the fallback reason.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@runtime_checkable
class Generator(Protocol):
    """A recommendation model. ``name``-``version`` is what responses report as ``model``."""

    name: str
    version: str

    def recommend(self, state: UserStateView, k: int, exclude: Set[str], *, domain: str) -> list[ScoredItem]:
        """Up to ``k`` items, best first, none in ``exclude``; ``domain`` picks the catalog."""
        ...


class PopularityGenerator:
    """The walking skeleton's main model: the domain's most popular items the user has not seen.

    It applies the user's state (their history is excluded), which is what separates it from the
    fallback answer for a user without state; the ranking itself is shared with PopularityFallback.
    """

    name = "popularity"

    def __init__(self, popularity: PopularityFallback, version: str = "v1"):
        self.popularity = popularity
        self.version = version

    def recommend(self, state: UserStateView, k: int, exclude: Set[str], *, domain: str) -> list[ScoredItem]:
        seen = set(exclude)
        seen.update(state.item_ids)
        return self.popularity.recommend(domain, k, seen).items
