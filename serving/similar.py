"""Similar items in serving: ``GET /similar/{item_id}`` and the similar-items candidate source of /recommend.

:class:`SimilarItems` holds the index `ugt similar build` wrote (models/similar; loaded at start when the
serving config names ``similar_index``, a missing or corrupt folder stops ``ugt serve``). When the index can
embed new items (its model reads semantic-ID codes) and ``live_items`` > 0, it follows the item job's feed
like the generator does (serving/live_items.py) and adds each new item by content before the next query.

The candidate source: for a user with few events (``similar_max_events``), the neighbours of their last items
are merged with the model's list by reciprocal rank, so a first session is steered by what it just touched;
when the model knows none of those items (items coded after training, before the engine has them) the
neighbours alone answer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.generator import ScoredItem
from serving.live_items import LiveCatalog

if TYPE_CHECKING:  # faiss is imported only by a service that loads an index (a GPU host may lack it)
    from models.similar import SimilarIndex

log = logging.getLogger("ugt.serving.similar")

RRF_K = 60  # reciprocal-rank fusion constant (as the generator's retrieval + beam merge)
SOURCE_ITEMS = 3  # the user's last items whose neighbours are candidates


class UnknownItem(KeyError):
    """The item is not in the similar-items index; the route answers 404 with this message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown item"


class SimilarItems:
    """The loaded index, queried under a lock (faiss must not search while an add rebuilds graph links)."""

    name = "similar"

    def __init__(self, index: SimilarIndex, *, live_items: int = 0,
                 redis_factory: Callable[[], Any] | None = None, sid_version: str = ""):
        self.index = index
        self.version = str(index.source.get("checkpoint_sha256", ""))[:8] or "v1"
        self._lock = threading.Lock()
        # an engine forked while a request thread holds a lock would wait on it forever: the child starts unlocked
        os.register_at_fork(after_in_child=self._fresh_locks)
        self.live: LiveCatalog | None = None
        tables = index.tables
        if live_items > 0 and redis_factory is not None and tables.embeds_new_items:
            trained = self.trained_codes()
            row = {item: i + 1 for i, item in enumerate(tables.item_ids)}
            self._code_of = lambda item: tuple(int(c) for c in trained[row[item]])
            self.live = LiveCatalog(
                redis_factory, trained_codes=trained, codebook_sizes=tables.codebook_sizes,
                genre_names=tables.genre_names, known=list(index.item_ids), slots=live_items,
                wanted_version=sid_version or tables.sid_version or None, with_trie=False)

    def _fresh_locks(self) -> None:
        self._lock = threading.Lock()
        if self.live is not None:
            self.live._lock = threading.Lock()  # the feed thread does not survive the fork; its lock must not either

    @classmethod
    def load(cls, folder: str | Path, **options: Any) -> SimilarItems:
        """Load an index folder (SimilarIndexError when it cannot be used) and tune faiss for serving."""
        import faiss

        faiss.omp_set_num_threads(1)  # one query at a time: idle OpenMP workers would spin on the event loop's cores
        from models.similar import SimilarIndex

        return cls(SimilarIndex.load(folder), **options)

    def trained_codes(self) -> np.ndarray:
        """The trained items' semantic-ID codes unshifted, by vocabulary index (row 0 unused): the live feed's
        check that it follows the artifact this index was built with."""
        tables = self.index.tables
        assert tables.codes is not None
        offsets = np.concatenate([[0], np.cumsum(tables.codebook_sizes)[:-1]]).astype(np.int64)
        codes = tables.codes - offsets - 1
        codes[0] = 0
        return codes

    @property
    def size(self) -> int:
        return len(self.index.item_ids)

    def start_background(self) -> None:
        """Follow the new-item feed in this process (the HTTP process for /similar, the engine for /recommend)."""
        if self.live is not None:
            self.live.ensure_started(self._code_of)

    def refresh(self) -> int:
        """Index the items the feed brought since the last call; returns how many."""
        if self.live is None:
            return 0
        new = self.live.take()
        if new is None:
            return 0
        with self._lock:
            added = self.index.add_new_items(new.item_ids, new.codes, new.genres, new.years)
        self.live.applied(new)
        if added:
            log.info("similar items: %d new items indexed (%d in all)", added, self.size)
        return added

    def neighbours(self, item_id: str, k: int, exclude: Iterable[str] = ()) -> list[ScoredItem]:
        """The k items nearest to ``item_id`` (inner product of the index vectors); UnknownItem if not indexed."""
        self.refresh()
        with self._lock:
            if item_id not in self.index.position:
                raise UnknownItem(f"item {item_id!r} is not in the similar-items index ({self.size} items; items "
                                  "coded after training join it when the index can embed them)")
            return [ScoredItem(i, s) for i, s in self.index.neighbours(item_id, k, exclude)]

    def candidates(self, recent: Sequence[str], n: int, exclude: Iterable[str] = ()) -> list[ScoredItem]:
        """Up to n neighbours of the last SOURCE_ITEMS indexed items of ``recent`` (oldest first), each scored by
        the sum of its inner products with them; [] when none is indexed."""
        self.refresh()
        skip = frozenset(exclude) | frozenset(recent)
        totals: dict[str, float] = {}
        with self._lock:
            sources = [item for item in reversed(recent) if item in self.index.position][:SOURCE_ITEMS]
            for item in sources:
                for other, score in self.index.neighbours(item, n, skip):
                    totals[other] = totals.get(other, 0.0) + score
        ranked = sorted(totals.items(), key=lambda pair: (-pair[1], pair[0]))[:n]
        return [ScoredItem(item, score) for item, score in ranked]


def merge_by_rank(first: Sequence[ScoredItem], second: Sequence[ScoredItem], n: int) -> list[ScoredItem]:
    """Reciprocal-rank fusion of two lists (score = sum of 1 / (RRF_K + rank)), best first, at most n."""
    fused: dict[str, float] = {}
    for ranked in (first, second):
        for rank, item in enumerate(ranked):
            fused[item.item_id] = fused.get(item.item_id, 0.0) + 1.0 / (RRF_K + rank + 1)
    best = sorted(fused.items(), key=lambda pair: -pair[1])[:n]
    return [ScoredItem(item, score) for item, score in best]
