"""New items served within seconds of their catalog event, without retraining: the generator's live catalog.

The item_semantic_ids job gives a brand-new item its semantic ID and announces it on a Redis stream per
artifact version (``ugt:sid:feed:<version>``, :func:`jobs.item_semantic_ids_logic.feed_key`). A
:class:`LiveCatalog` follows that stream from a background thread (blocking ``XREAD``, so an item arrives
as soon as it is coded, and a restarted server reads the whole feed again), checks every entry, grows its prefix
trie off the request path (spare rows for every slot, a few entries written per item), and hands the inference
thread a batch to apply (:meth:`LiveCatalog.take`): a few table rows and the same trie entries written in place
(the first batch swaps in a copy of the whole trie). A new item has no
trained ID row; the model embeds it from its semantic-ID codes and metadata (models/ugt/embedding.py), so
retrieval scores it, the ranking head ranks it and the constrained beam search can generate it.

Which version: the one the checkpoint's codes came from (``semantic_ids_version``, written by ``ugt train``),
or the serving key ``sid_version``, or else the active one (``ugt:sid:active``). Whichever it is, a sample
of the trained items' codes must match that version's index, so a model never serves codes of another
artifact; a mismatch is logged with what to do and retried, since a backfill may flip the pointer back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.data import year_bucket
from models.ugt.heads import PrefixTrie, TrieEdit

log = logging.getLogger("ugt.serving.live_items")

DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SAMPLE = 64  # trained items whose codes must match the version's index
RECHECK_S = 30.0  # how often a catalog whose version does not match looks again


@dataclass
class NewItems:
    """Items accepted from the feed, in order: the engine gives them the next indices in the same order."""

    item_ids: list[str]
    codes: np.ndarray  # (n, L)
    genres: np.ndarray  # (n, G) genre indices (0 = none)
    years: np.ndarray  # (n,) decade buckets (0 = unknown)
    coded_at: list[float]  # epoch seconds the job announced each (the feed entry's id)
    trie: PrefixTrie | None  # a whole trie to swap in (the first batch), over every item served once these are in
    trie_edits: list[TrieEdit] = field(default_factory=list)  # then replayed in order on the engine's trie, in place


@dataclass
class LiveStats:
    """What the metrics report (read at scrape time)."""

    items: int = 0  # applied, served now
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    feed_errors: int = 0
    delay_buckets: list[int] = field(default_factory=lambda: [0] * (len(DELAY_BUCKETS) + 1))
    delay_sum: float = 0.0
    version: str = ""
    state: str = "starting"  # starting | following | superseded | mismatch | full

    def observe_delay(self, seconds: float) -> None:
        self.delay_sum += seconds
        for i, bound in enumerate(DELAY_BUCKETS):
            if seconds <= bound:
                self.delay_buckets[i] += 1
                return
        self.delay_buckets[-1] += 1


def resolve_version(client: Any, wanted: str | None, trained: dict[str, str]) -> tuple[str | None, str]:
    """(version to follow or None, why): ``wanted`` or the active version, if its index agrees with ``trained``
    (item id -> code string of a sample of trained items)."""
    from contracts.redis_keys import active_version, item_key

    version = wanted or active_version(client)
    if not version:
        return None, "no semantic-ID version is active yet (start the item_semantic_ids job)"
    ids = list(trained)
    found = [(c.decode() if isinstance(c, bytes) else c) for c in client.hmget(item_key(version), ids)] if ids else []
    pairs = [(trained[i], c) for i, c in zip(ids, found, strict=True) if c is not None]
    if len(pairs) * 2 < len(ids):
        return None, (f"only {len(pairs)} of {len(ids)} sampled trained items are in version {version}'s index: it is "
                      "not the artifact this model was trained with (set the serving key sid_version, or retrain)")
    wrong = sum(1 for ours, theirs in pairs if ours != theirs)
    if wrong:
        return None, (f"{wrong} of {len(pairs)} sampled trained items have other codes in version {version}: a "
                      "different artifact; new items wait until a model trained on it is served")
    return version, f"version {version} matches the checkpoint's codes ({len(pairs)} sampled items)"


class LiveCatalog:
    """Follows one version's feed; ``take()`` hands the inference thread what to apply.

    ``trained_codes`` (V + 1, L) are the checkpoint's codes by vocabulary index (row 0 unused), ``known`` the
    trained item ids, ``slots`` how many new items the engine has room for. ``client_factory`` makes a Redis
    client for the feed thread (its own connection: ``XREAD BLOCK`` holds one).
    """

    def __init__(self, client_factory: Callable[[], Any], *, trained_codes: np.ndarray, codebook_sizes: list[int],
                 genre_names: Sequence[str], known: Sequence[str], slots: int, wanted_version: str | None = None,
                 block_ms: int = 1000, read_count: int = 10_000, with_trie: bool = True):
        self.client_factory = client_factory
        self.trained_codes = np.asarray(trained_codes, np.int64)
        self.codebook_sizes = list(codebook_sizes)
        self.genre_of = {g: i + 1 for i, g in enumerate(genre_names)}
        self.known: set[str] = set(known)
        self.codes_taken: set[tuple[int, ...]] = {tuple(c) for c in self.trained_codes[1:].tolist()}
        self.slots = slots
        self.wanted_version = wanted_version
        self.block_ms, self.read_count, self.with_trie = block_ms, read_count, with_trie
        ordered = list(known)
        self.sample = ordered[:: max(len(ordered) // SAMPLE, 1)][:SAMPLE]
        self.stats = LiveStats()
        self.accepted: list[np.ndarray] = []  # codes of every accepted item, in order (for the trie)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, tuple[int, ...], np.ndarray, int, float]] = []
        self._pending_trie: PrefixTrie | None = None
        self._pending_edits: list[TrieEdit] = []
        self._trie: PrefixTrie | None = None  # the feed thread's own, grown in place as items arrive
        self._last_id = "0-0"
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stop = threading.Event()

    def trained_sample(self, code_of: Callable[[str], tuple[int, ...]]) -> dict[str, str]:
        from contracts.redis_keys import code_string

        return {item: code_string(code_of(item)) for item in self.sample}

    # ---- the feed thread ----------------------------------------------------------------------------

    def ensure_started(self, code_of: Callable[[str], tuple[int, ...]]) -> None:
        """Start the feed thread in this process if it is not running here (a forked engine starts its own)."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._stop.clear()
        sample = self.trained_sample(code_of)
        self._thread = threading.Thread(target=self._follow, args=(sample,), name="ugt-live-items", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout)

    def _follow(self, sample: dict[str, str]) -> None:
        client = None
        version = None
        checked = time.monotonic()  # when the active pointer was last compared with the followed version
        while not self._stop.is_set():
            try:
                if client is None:
                    client = self.client_factory()
                if version is None:
                    version, why = resolve_version(client, self.wanted_version, sample)
                    if version is None:
                        if self.stats.state != "mismatch":
                            log.error("new items are not served: %s", why)
                        self.stats.state = "mismatch"
                        self._stop.wait(RECHECK_S)
                        continue
                    log.info("following new items of semantic-ID version %s: %s", version, why)
                    self.stats.version, self.stats.state = version, "following"
                    checked = time.monotonic()
                self.poll(client, version)
                if time.monotonic() - checked > RECHECK_S:
                    self.check_active(client, version)
                    checked = time.monotonic()
            except Exception as exc:  # Redis down or slow: keep serving what we have, try again
                self.stats.feed_errors += 1
                if self.stats.feed_errors in (1, 10) or self.stats.feed_errors % 100 == 0:
                    log.warning("reading the new-item feed failed (%s: %s; %d errors so far); retrying",
                                type(exc).__name__, exc, self.stats.feed_errors)
                client = None
                self._stop.wait(1.0)

    def check_active(self, client: Any, version: str) -> None:
        """Notice a backfill's flip: the item job then codes new items under the active version only, and this
        model, trained on ``version``'s codes, keeps what it has until a model trained on the new one is served."""
        from contracts.redis_keys import active_version

        active = active_version(client)
        if active and active != version and self.stats.state == "following":
            log.warning("semantic-ID version %s is active now; this model follows %s, whose feed gets no new items "
                        "any more: retrain on the new artifact to serve items coded from now on", active, version)
            self.stats.state = "superseded"
        elif active == version and self.stats.state == "superseded":
            self.stats.state = "following"

    def poll(self, client: Any, version: str, block_ms: int | None = None) -> int:
        """One read of the feed after the last entry seen; returns how many entries were accepted."""
        from contracts.redis_keys import feed_key

        block = self.block_ms if block_ms is None else block_ms
        answer = client.xread({feed_key(version): self._last_id}, count=self.read_count, block=block or None)
        staged: list[tuple[str, tuple[int, ...], np.ndarray, int, float]] = []
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                self._accept(self._last_id, fields, staged)
        if staged:
            # the trie over trained + every accepted item (indices in acceptance order), built off the request
            # path and handed over with the items it adds, so a take() never sees one without the other
            trie, edit = self._grow_trie(len(staged)) if self.with_trie else (None, None)
            with self._lock:
                self._pending.extend(staged)
                if trie is not None:
                    self._pending_trie, self._pending_edits = trie, []
                if edit is not None:
                    self._pending_edits.append(edit)
        return len(staged)

    def _grow_trie(self, added: int) -> tuple[PrefixTrie | None, TrieEdit | None]:
        """(a whole trie, None) the first time, then (None, the edit that adds the ``added`` newest items).

        The feed thread keeps its own trie with spare rows for every slot and grows it in place; the engine gets
        a copy once and then only the edits (a few table entries per item, where a rebuild took seconds at a
        million items and a copy of every table on the GPU).
        """
        trained = len(self.trained_codes) - 1
        if self._trie is None:
            self._trie = PrefixTrie(self.trained_codes[1:], self.codebook_sizes).with_room(self.slots)
            self._trie.add(np.stack(self.accepted), np.arange(trained + 1, trained + 1 + len(self.accepted)))
            return self._trie.clone(), None
        first = trained + len(self.accepted) - added + 1  # the first new item's index
        return None, self._trie.add(np.stack(self.accepted[-added:]), np.arange(first, first + added))

    def _reject(self, reason: str) -> int:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        return 0

    def _accept(self, entry_id: str, raw: dict, staged: list) -> int:
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in raw.items()}
        item_id = fields.get("item_id", "")
        if not item_id:
            return self._reject("bad_entry")
        if item_id in self.known:
            return self._reject("known")  # trained, or announced twice (a replayed job): already served
        try:
            code = tuple(int(part) for part in fields["code"].split("-"))
            genres = json.loads(fields.get("categories") or "[]")
            year = int(fields["year"]) if fields.get("year") else None
        except (KeyError, ValueError, TypeError):
            return self._reject("bad_entry")
        if len(code) != len(self.codebook_sizes) or any(not 0 <= c < k for c, k in zip(code, self.codebook_sizes,
                                                                                         strict=True)):
            return self._reject("code_out_of_range")
        if code in self.codes_taken:
            return self._reject("duplicate_code")
        if len(self.accepted) >= self.slots:
            if self.stats.state != "full":
                log.error("the live catalog is full (%d new items): raise the serving key live_items, or retrain "
                          "so new items get trained rows", self.slots)
            self.stats.state = "full"
            return self._reject("full")
        genre_idx = np.asarray([self.genre_of.get(str(g), 0) for g in genres if str(g) in self.genre_of] or [0],
                               np.int64)
        coded_at = int(entry_id.split("-")[0]) / 1000.0
        staged.append((item_id, code, genre_idx, year_bucket(year) if year else 0, coded_at))
        self.known.add(item_id)
        self.codes_taken.add(code)
        self.accepted.append(np.asarray(code, np.int64))
        return 1

    # ---- the inference thread -----------------------------------------------------------------------

    def take(self) -> NewItems | None:
        """Everything accepted since the last take (None if nothing), with the trie covering it."""
        if not self._pending:
            return None
        with self._lock:
            pending, self._pending = self._pending, []
            trie, self._pending_trie = self._pending_trie, None
            edits, self._pending_edits = self._pending_edits, []
        width = max(len(p[2]) for p in pending)
        genres = np.zeros((len(pending), width), np.int64)
        for row, p in enumerate(pending):
            genres[row, : len(p[2])] = p[2]
        return NewItems(item_ids=[p[0] for p in pending], codes=np.asarray([p[1] for p in pending], np.int64),
                        genres=genres, years=np.asarray([p[3] for p in pending], np.int64),
                        coded_at=[p[4] for p in pending], trie=trie, trie_edits=edits)

    def applied(self, items: NewItems) -> None:
        now = time.time()
        self.stats.items += len(items.item_ids)
        for t in items.coded_at:
            self.stats.observe_delay(max(now - t, 0.0))
