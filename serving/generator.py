"""The generator interface: user state in, scored candidate items out.

The HTTP layer only knows :class:`Generator`, so the walking-skeleton popularity model
(:class:`serving.fallback.PopularityGenerator`) and the UGT generator (serving/ugt_generator.py) are
interchangeable through config (`generator:`). This module knows no implementation: they import it.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from serving.user_state_reader import UserStateView

NO_KNOWN_ITEMS = "no_known_items"  # fallback reason: the model knows none of the user's items


class ScoredItem(NamedTuple):
    """One answer item. A named tuple, not a frozen dataclass: a model answer builds k of them per request,
    and a frozen dataclass costs ~1 µs each to construct."""

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


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One user's share of a batched generator call (serving/batcher.py groups concurrent requests).

    ``exclude`` is every item the answer must not hold: the request's ``exclude`` plus the user's history
    (``state.item_ids``), as the service passes it to :meth:`Generator.recommend` too.
    """

    state: UserStateView
    k: int
    exclude: frozenset[str] = field(default_factory=frozenset)
    domain: str = "movie"


# What recommend_batch returns per request: its items, or why the model cannot answer that one user
# (a NoModelAnswer instance, returned rather than raised so one user never fails the whole batch).
BatchAnswer = list[ScoredItem] | NoModelAnswer


@runtime_checkable
class BatchGenerator(Protocol):
    """Optional: a generator that answers many requests in one model call (one forward pass per batch).

    The dynamic batcher calls ``recommend_batch`` when the generator has it, else ``recommend`` per request.
    Answers come back in request order, one per request; an exception raised by the call fails every
    request of the batch (each then gets the ``generator_error`` fallback).
    """

    def recommend_batch(self, requests: list[GenerationRequest]) -> list[BatchAnswer]: ...


def has_batch(generator: object) -> bool:
    """True when ``generator`` implements :meth:`BatchGenerator.recommend_batch`."""
    return callable(getattr(generator, "recommend_batch", None))


@runtime_checkable
class Generator(Protocol):
    """A recommendation model. ``name``-``version`` is what responses report as ``model``."""

    name: str
    version: str

    def recommend(self, state: UserStateView, k: int, exclude: Set[str], *, domain: str) -> list[ScoredItem]:
        """Up to ``k`` items, best first, none in ``exclude``; ``domain`` picks the catalog."""
        ...
