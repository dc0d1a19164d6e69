"""UGTGenerator: the trained UGT model answering /recommend on the CPU path (dot-product retrieval head).

The checkpoint is loaded once at start (a missing or broken file stops ``ugt serve`` with a message
naming it). With ``live_items > 0`` the catalog grows while serving: items the item_semantic_ids job codes
after training are added from its Redis feed (serving/live_items.py) and answered like trained ones. Per request the user's streaming state becomes the same model input the evaluator builds
(:func:`models.data.history_row`), every catalog item is scored against the user state, history and
``exclude`` are masked, and the top ``k`` item ids come back through the checkpoint's vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts.tokenizer import time_gap_bucket
from models.data import history_row, time_gap_bucket_array, window_start
from models.eval import batch_to_device, last_states
from models.ugt.inference import InferenceConfig, UGTInference
from models.ugt.runner.batch import extend_hash, fingerprint_from, prefix_hash
from serving.generator import NO_KNOWN_ITEMS, BatchAnswer, GenerationRequest, NoModelAnswer, ScoredItem
from serving.live_items import LiveCatalog
from serving.live_stream import LiveStreamVectors, StreamEvents
from serving.user_state_reader import UserStateView

log = logging.getLogger("ugt.serving.ugt_generator")
HASH_CHARS = 8


@dataclass(slots=True)
class PreparedUser:
    """A user's model row and history exclusions, kept while their events stay the same.

    Between two requests of a user with no new event only the last position's query time (the request time)
    and its gap bucket change, so a repeat request patches two numbers instead of rebuilding the row
    (``history_row`` is ~0.2 ms of small-array numpy per request, as much as the batched model itself).
    """

    item_ids: tuple[str, ...]
    event_times: tuple[int, ...]
    rating_tokens: tuple[int, ...]
    history: frozenset[str]
    row: dict[str, np.ndarray]
    seen: np.ndarray  # sorted vocabulary indices of the known history items
    fingerprint: bytes  # the KV cache's key for this prefix: it does not depend on the request time
    hashed: Any  # the fingerprint's hash of the row's positions before its last (an append extends a copy)

    def same_events(self, state: UserStateView) -> bool:
        if self.item_ids is state.item_ids and self.event_times is state.event_times \
                and self.rating_tokens is state.rating_tokens:  # the reader's kept view: the same tuples
            return True
        return (self.item_ids == state.item_ids and self.event_times == state.event_times
                and self.rating_tokens == state.rating_tokens)


@dataclass(slots=True)
class Gathered:
    """A batch's rows for the model (:meth:`UGTGenerator.gather`): ``where`` says which request each row is."""

    answers: list[BatchAnswer] = field(default_factory=list)
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)
    excludes: list[np.ndarray] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    prints: list[bytes] = field(default_factory=list)
    where: list[int] = field(default_factory=list)
    k: int = 0


class CheckpointError(ValueError):
    """The UGT checkpoint cannot be used; the message names the file and what to do."""


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:HASH_CHARS]


def batch_buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The default buckets (1, 8, 32, 128), then powers of two up to ``max_batch`` (rounded up to one)."""
    buckets = list(InferenceConfig.batch_buckets)
    while buckets[-1] < max_batch:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def default_inference(model: torch.nn.Module, device: str, kv_cache_users: int, kv_cache_bytes: int, compile_cpu: bool,
                      quantize: str, rank_top: int, beam_size: int, max_batch: int,
                      kv_cache_admission: str = "lru", paged_attention: bool = False) -> InferenceConfig:
    """The engine settings the serving keys ask for.

    kv_cache_users > 0: a user whose events did not change since the last request runs only the last event through
    the layers against the cached prefix, one with new events only those (an append; models/ugt/runner/slot_cache.py),
    on CPU too; kv_cache_bytes > 0 caps the pool's bytes. compile_cpu: torch.compile the CPU path (CUDA has CUDA graphs
    instead). rank_top: -1 = the checkpoint's own (when it has a ranking head and there is a KV cache to read).
    max_batch: the most rows one model step gets (batch_max_size, or engine_max_rows with engine_scope: model);
    buckets up to it, so a batch past 128 replays a captured graph instead of running eager. paged_attention: the
    cached steps read the KV pool in place (models/kernels/slot_attention.py).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device: cuda, but torch sees no CUDA GPU here: set device: auto or cpu")
    if rank_top < 0:
        rank_top = model.config.heads.rank_top if model.ranker is not None and kv_cache_users > 0 else 0
    return InferenceConfig(device=device, cache_slots=kv_cache_users, cache_bytes=kv_cache_bytes,
                           cache_admission=kv_cache_admission,
                           batch_buckets=batch_buckets_up_to(max_batch), compile=compile_cpu and device == "cpu",
                           quantize=quantize, rank_top=rank_top, beam_size=beam_size,
                           merge="rrf" if beam_size > 0 else "retrieval", paged_attention=paged_attention)


def sorted_union(seen: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``np.union1d(seen, new)`` for a sorted unique ``seen`` and a few ``new``: those not in it inserted in place
    (no sort of the whole history per appended event)."""
    new = np.unique(new)
    at = np.searchsorted(seen, new)
    absent = (at == len(seen)) | (seen[np.minimum(at, len(seen) - 1)] != new) if len(seen) else np.ones(len(new), bool)
    return np.insert(seen, at[absent], new[absent]) if absent.any() else seen


class UGTGenerator:
    """Top-k items by the UGT retrieval head; ``version`` = the checkpoint's run name + a file hash.

    ``clock`` gives the request time in epoch seconds (the last position's query time, as the target's
    time is in evaluation); tests pin it. The model has one catalog, so ``domain`` does not change the answer.
    """

    name = "ugt"

    def __init__(self, checkpoint: str | Path, *, clock: Callable[[], float] = time.time,
                 inference: InferenceConfig | None = None, kv_cache_users: int = 0, kv_cache_bytes: int = 0,
                 compile_cpu: bool = False, quantize: str = "none",
                 rank_top: int = -1, beam_size: int = 0, live_items: int = 0,
                 redis_factory: Callable[[], object] | None = None, sid_version: str = "",
                 device: str = "auto", max_batch: int = 128, kv_cache_admission: str = "lru",
                 history_hop: int = 0, paged_attention: bool = False):
        from models.checkpoint import load_checkpoint, long_history_len

        path = Path(checkpoint)
        fix = "point the serving config's `checkpoint:` at a checkpoint.pt written by `ugt train`"
        if not path.is_file():
            raise CheckpointError(f"UGT checkpoint {str(path)!r} does not exist: {fix}")
        try:
            model, cfg, data, ckpt = load_checkpoint(path)
        except Exception as exc:  # torch.load / unpickling / state-dict errors come in many types
            raise CheckpointError(
                f"UGT checkpoint {str(path)!r} cannot be loaded ({type(exc).__name__}: {exc}); "
                f"the file is corrupt or not a `ugt train` checkpoint: retrain or {fix}"
            ) from exc
        if cfg.model != "ugt":
            raise CheckpointError(f"checkpoint {str(path)!r} holds a {cfg.model!r} model, not 'ugt': {fix}")
        self.path = path
        self.version = f"{cfg.name}-{_file_hash(path)}"
        self.model = model.eval()
        self.max_len = cfg.max_len
        self.max_long = long_history_len(cfg)
        if not 0 <= history_hop < self.max_len:
            raise CheckpointError(f"the serving key history_hop ({history_hop}) must be in 0..{self.max_len - 1}: "
                                  f"below {str(path)!r}'s window of {self.max_len} events")
        self.history_hop = history_hop
        self.item_to_index: dict[str, int] = dict(ckpt["vocab"])
        self.index_to_item = [""] * (data.num_items + 1)
        for item_id, index in self.item_to_index.items():
            self.index_to_item[index] = item_id
        self.item_names = np.asarray(self.index_to_item, dtype=object)  # index array -> item ids in one take
        self.prepared: OrderedDict[str, PreparedUser] = OrderedDict()  # LRU, as many users as the KV cache
        self.prepared_capacity = max(kv_cache_users, 0)
        self.num_items = data.num_items
        self.clock = clock
        with torch.inference_mode():
            self.table = self.model.item_embeddings().float()  # fixed after training: computed once
        if inference is None:  # GPU when there is one (bf16, CUDA graphs, fused attention), else CPU fp32
            inference = default_inference(model, device, kv_cache_users, kv_cache_bytes, compile_cpu, quantize,
                                          rank_top, beam_size, max_batch, kv_cache_admission, paged_attention)
        self.codes = ckpt.get("semantic_codes")
        self.live: LiveCatalog | None = None
        if live_items > 0 and redis_factory is not None:
            if self.codes is None or "sid" not in model.config.embedding.item_repr:
                log.info("%s embeds items by ID only: items added after training wait for a retrain "
                         "(train with item_repr id+sid to serve them live)", path)
            else:
                inference = dataclasses.replace(inference, new_item_slots=live_items)
                self.live = LiveCatalog(
                    redis_factory, trained_codes=self.codes, codebook_sizes=list(ckpt["codebook_sizes"]),
                    genre_names=data.genre_names, known=list(self.item_to_index), slots=live_items,
                    wanted_version=sid_version or ckpt.get("semantic_ids_version"),
                    with_trie=model.sid_head is not None)
        try:
            self.engine = UGTInference(self.model, inference)
        except ValueError as exc:  # bad inference settings, e.g. compile without a C++ compiler
            hint = "; or set the serving key torch_compile: false" if inference.compile else ""
            if inference.rank_top > 0 and ("rank_top" in str(exc) or "cache_slots" in str(exc)):
                hint = "; set the serving key rank_top: 0, or -1 to follow the checkpoint (and kv_cache_users > 0)"
            if "cache_bytes" in str(exc):
                hint = "; raise the serving key kv_cache_bytes, or 0 for no byte budget"
            if "quantize" in str(exc):
                hint = "; set the serving key quantize: none, or change what the reason names (torch_compile, device)"
            if "paged_attention" in str(exc):
                hint = "; set the serving key paged_attention: false, or serve on a CUDA GPU with kv_cache_users > 0"
            if "semantic-ID head" in str(exc):
                hint = "; set the serving key beam_size: 0 for this checkpoint"
            raise CheckpointError(f"cannot serve {str(path)!r}: {exc}{hint}") from exc
        if self.engine.cache is not None:  # the byte budget may hold fewer users: keep as many rows as slots
            self.prepared_capacity = min(self.prepared_capacity, self.engine.cache.capacity)
        self.stream = self._stream_vectors()
        # engine_scope: model's workers: live-item events found here go to the engine with the batch's rows
        self.stream_outbox: StreamEvents | None = None
        self.stream_sent: set[tuple[str, int]] = set()  # (user, item) pairs sent to the engine already

    def _stream_vectors(self) -> LiveStreamVectors | None:
        """Live items scored by their stream vectors (serving/live_stream.py), when the checkpoint asks for them."""
        if self.live is None or self.model.config.embedding.stream_k <= 0:
            return None
        e = self.engine  # the served model: its tables hold the reserved live rows, its table is what is scored
        return LiveStreamVectors(e.model, e.layout, e.table, self.max_len, self.max_long)

    def _code_of(self, item_id: str) -> tuple[int, ...]:
        return tuple(int(c) for c in self.codes[self.item_to_index[item_id]])

    def start_background(self) -> None:
        """Start following new items (in the process that serves: a forked engine calls this itself)."""
        if self.live is not None:
            self.live.ensure_started(self._code_of)

    def apply_new_items(self) -> int:
        """Serve the items the live catalog accepted since the last call; returns how many (inference thread)."""
        if self.live is None:
            return 0
        self.live.ensure_started(self._code_of)
        new = self.live.take()
        if new is None:
            return 0
        indices = self.engine.add_items(new.codes, new.genres, new.years, new.trie, new.trie_edits)
        for item_id, index in zip(new.item_ids, indices.tolist(), strict=True):
            self.item_to_index[item_id] = index
            self.index_to_item.append(item_id)
        self.item_names = np.asarray(self.index_to_item, dtype=object)
        self.prepared.clear()  # a kept row may have dropped one of these items from a history as unknown
        self.live.applied(new)
        return len(new.item_ids)

    def item_indices(self, item_ids: tuple[str, ...]) -> np.ndarray:
        """Each item id's vocabulary index, 0 for an item the model does not know (index 0 is no item): one dict
        lookup per event, in C (three Python passes over a 1,024-event history were ~0.4 ms)."""
        return np.fromiter(map(self.item_to_index.get, item_ids, repeat(0)), dtype=np.int64, count=len(item_ids))

    def model_input(self, state: UserStateView, query_time: int,
                    indices: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
        """The state's known events as one model row (None when no event's item is in the vocab); ``indices``:
        :meth:`item_indices` of its items, when the caller has them."""
        indices = self.item_indices(state.item_ids) if indices is None else indices
        known = indices > 0
        if not known.any():
            return None
        times = np.asarray(state.event_times, dtype=np.int64) // 1000  # ms -> s, as trained
        ratings = np.asarray(state.rating_tokens, dtype=np.int64)
        if not known.all():  # events on unknown items dropped
            indices, times, ratings = indices[known], times[known], ratings[known]
        return history_row(indices, times, ratings, self.max_len, self.max_long, query_time)

    def windowed(self, state: UserStateView) -> UserStateView:
        """The state's events from :func:`models.data.window_start` on (with ``history_hop`` > 0 the window's
        start moves in steps of that many events, so a user with a full window appends to their cached prefix
        for ``hop - 1`` new events instead of missing on each); the state itself when nothing is cut."""
        n = len(state.item_ids)
        if not self.history_hop or n <= self.max_len - self.history_hop + 1:
            return state
        count = max(state.event_count, n)  # the events before the kept ones count from the stream's start
        cut = window_start(count, self.max_len, self.history_hop) - (count - n)
        if cut <= 0:
            return state
        return dataclasses.replace(state, item_ids=state.item_ids[cut:], action_tokens=state.action_tokens[cut:],
                                   rating_tokens=state.rating_tokens[cut:], event_times=state.event_times[cut:],
                                   _history=None)

    def prepare(self, state: UserStateView, query_time: int) -> PreparedUser | None:
        """The user's row for a request at ``query_time`` (reused and patched when their events are unchanged).
        The row and its ``seen`` are the :meth:`windowed` state's (a request's exclusions past them are added)."""
        whole, state = state, self.windowed(state)
        cached = self.prepared.get(state.user_id) if self.prepared_capacity else None
        if cached is not None and cached.same_events(state):
            self.prepared.move_to_end(state.user_id)
            row = cached.row
            last = int(row["lengths"][0]) - 1
            row["query_times"][0, last] = query_time
            row["query_gaps"][0, last] = time_gap_bucket(float(query_time - row["times"][0, last]))
            return cached
        row = self.extended_row(cached, state, query_time) if cached is not None else None
        if row is not None and cached is not None:  # only known items were appended: extend the exclusions too
            old = len(cached.item_ids)
            seen = sorted_union(cached.seen, row["ids"][0, old : int(row["lengths"][0])])
            history = state.history()
            hashed = extend_hash(cached.hashed.copy(), row, old - 1, int(row["lengths"][0]) - 1)
        else:
            indices = self.item_indices(state.item_ids)
            row = self.model_input(state, query_time, indices)
            if row is None:
                return None
            seen = np.unique(indices[indices > 0])  # sorted, each known history item once
            history = state.history()
            hashed = prefix_hash(row, int(row["lengths"][0]) - 1)
        if self.stream is not None:  # the user's events changed: count any new event on a live item
            self.observe_stream(whole)  # every stored event, also those before the window's start
        prepared = PreparedUser(state.item_ids, state.event_times, state.rating_tokens, history, row, seen,
                                fingerprint_from(hashed, row), hashed)
        if self.prepared_capacity:
            self.prepared[state.user_id] = prepared
            self.prepared.move_to_end(state.user_id)
            if len(self.prepared) > self.prepared_capacity:
                self.prepared.popitem(last=False)
        return prepared

    def observe_stream(self, state: UserStateView) -> None:
        """Add the state's uncounted live-item events to their stream sums and rewrite those items' served rows
        (or, in an engine_scope: model worker, keep them for the engine, which owns the model and the table)."""
        keep = [i for i, item in enumerate(state.item_ids) if item in self.item_to_index]
        items = np.asarray([self.item_to_index[state.item_ids[i]] for i in keep], dtype=np.int64)
        if not len(items) or int(items.max()) < self.stream.live_from:
            return
        times = np.asarray([state.event_times[i] // 1000 for i in keep], dtype=np.int64)  # ms -> s, as trained
        ratings = np.asarray([state.rating_tokens[i] for i in keep], dtype=np.int64)
        if self.stream_outbox is None:
            self.stream.observe(state.user_id, items, times, ratings)
        else:
            self.stream_outbox.extend(self.stream.pending(state.user_id, items, times, ratings, self.stream_sent))

    def fresh_items(self, item_ids: Iterable[str]) -> set[str]:
        """Which of these items arrived after training (live items): what the reranker's exploration places."""
        return {i for i in item_ids if self.item_to_index.get(i, 0) > self.num_items}

    def learn_items(self, names: dict[int, str]) -> int:
        """Take the ids of items the engine serves past this copy's vocabulary (an engine_scope: model worker:
        its rows then hold them, and mask them as seen); returns how many were new here."""
        added = 0
        for index in sorted(names):
            if index == len(self.index_to_item):  # the engine names them in order from this copy's size
                self.index_to_item.append(names[index])
                self.item_to_index[names[index]] = index
                added += 1
        if added:
            self.item_names = np.asarray(self.index_to_item, dtype=object)
            self.prepared.clear()  # a kept row may have dropped one of these items from a history as unknown
        return added

    def extended_row(self, cached: PreparedUser, state: UserStateView, query_time: int) -> dict[str, np.ndarray] | None:
        """The cached row plus the state's new events, when the state only appended known items to the cached
        events and the window does not slide (None otherwise: :meth:`model_input` rebuilds it). Equal to
        :meth:`model_input` of the whole state (tests/serving/test_ugt_generator.py), at a fraction of its cost: a
        stream of new events is the common case, and rebuilding every row in Python bounded the GPU engine."""
        old = len(cached.item_ids)
        new_items = state.item_ids[old:]
        if (not new_items or state.item_ids[:old] != cached.item_ids or state.event_times[:old] != cached.event_times
                or state.rating_tokens[:old] != cached.rating_tokens):
            return None
        row = cached.row
        n = int(row["lengths"][0])
        if n != old or n + len(new_items) > self.max_len or any(i not in self.item_to_index for i in new_items):
            return None  # an unknown item dropped, or the window would slide: rebuild
        m = n + len(new_items)
        out = {key: value.copy() for key, value in row.items()}
        times = np.asarray(state.event_times[old:], dtype=np.int64) // 1000  # ms -> s, as trained
        out["ids"][0, n:m] = [self.item_to_index[i] for i in new_items]
        out["times"][0, n:m] = times
        out["ratings"][0, n:m] = state.rating_tokens[old:]
        all_times = out["times"][0]
        lo = max(n - 1, 0)
        # each new event's gap to the one before it (the first's to the cached last event), without the
        # temporaries of np.diff(prepend=) / np.append: the same numbers
        gaps = all_times[n:m] - all_times[n - 1:m - 1] if n else np.diff(times, prepend=times[0])
        out["gaps"][0, n:m] = time_gap_bucket_array(gaps)
        query_times = out["query_times"][0]
        query_times[lo:m - 1] = all_times[lo + 1:m]
        query_times[m - 1] = query_time
        out["query_gaps"][0, lo:m] = time_gap_bucket_array(query_times[lo:m] - all_times[lo:m])
        out["lengths"][0] = m
        return out

    def exclusions(self, prepared: PreparedUser, exclude: Set[str]) -> np.ndarray:
        """Sorted vocabulary indices to mask: the history's, plus any requested item outside the history."""
        if exclude is prepared.history or exclude == prepared.history:  # the usual exclude (history): no new set
            return prepared.seen
        outside = frozenset(exclude) - prepared.history  # frozenset(a frozenset) is the same object: no copy
        extra = {self.item_to_index[i] for i in outside if i in self.item_to_index}
        if not extra:
            return prepared.seen
        return np.union1d(prepared.seen, np.fromiter(extra, dtype=np.int64, count=len(extra)))

    def answer(self, indices: np.ndarray, scores: np.ndarray, k: int) -> list[ScoredItem]:
        n = min(k, len(indices))
        pairs = zip(self.item_names[indices[:n]].tolist(), scores[:n].tolist(), strict=True)
        return [tuple.__new__(ScoredItem, pair) for pair in pairs]  # skips the named tuple's Python __new__

    def scores(self, state: UserStateView) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores over item indices 0..V, invalid mask) for the user; raises NoModelAnswer."""
        row = self.model_input(self.windowed(state), int(self.clock()))
        if row is None:
            raise NoModelAnswer(
                NO_KNOWN_ITEMS, f"none of the {len(state.item_ids)} history items is in {self.version}'s vocabulary"
            )
        with torch.inference_mode():
            batch = batch_to_device(row, torch.device("cpu"))
            user, _ = self.model(batch)
            scores = (last_states(user.float(), batch["lengths"]) @ self.table.T)[0]
        invalid = torch.zeros(self.num_items + 1, dtype=torch.bool)
        invalid[0] = True
        invalid[torch.as_tensor(row["ids"][0])] = True
        return scores, invalid

    def recommend(self, state: UserStateView, k: int, exclude: Set[str], *, domain: str) -> list[ScoredItem]:
        if self.engine.config.rank_top > 0 or self.engine.config.merge == "rrf" or self.live is not None:
            answer = self.recommend_batch([GenerationRequest(state, k, frozenset(exclude), domain)])[0]
            if isinstance(answer, NoModelAnswer):
                raise answer
            return answer
        scores, invalid = self.scores(state)
        masked = {self.item_to_index[i] for i in set(exclude) | set(state.item_ids) if i in self.item_to_index}
        if masked:
            invalid[torch.as_tensor(sorted(masked))] = True
        n = min(k, int((~invalid).sum()))
        if n <= 0:
            return []
        top = scores.masked_fill(invalid, float("-inf")).topk(n)
        return [
            ScoredItem(self.index_to_item[i], float(s))
            for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def recommend_batch(self, requests: list[GenerationRequest]) -> list[BatchAnswer]:
        """Every request in one padded model batch (see models.ugt.inference); answers in request order.

        Same items as :meth:`recommend` per request (on CPU: same scores too; on GPU bf16 rounds them).
        A user with no known item gets a NoModelAnswer in their place; the others are unaffected.
        """
        self.apply_new_items()
        batch = self.gather(requests)
        if batch.rows:
            tops = self.engine.recommend(batch.rows, batch.excludes, batch.k, batch.keys, batch.prints)
            for i, top in zip(batch.where, tops, strict=True):
                batch.answers[i] = self.answer(top.indices, top.scores, requests[i].k)
        return batch.answers

    def gather(self, requests: list[GenerationRequest]) -> Gathered:
        """The model rows of a batch: the users the model knows, and a NoModelAnswer in place of each other."""
        now = int(self.clock())
        batch = Gathered()
        for i, req in enumerate(requests):
            prepared = self.prepare(req.state, now)
            if prepared is None:
                batch.answers.append(NoModelAnswer(
                    NO_KNOWN_ITEMS, f"none of the {len(req.state.item_ids)} history items is in {self.version}'s vocabulary"))
                continue
            batch.answers.append([])
            batch.rows.append(prepared.row)
            batch.excludes.append(self.exclusions(prepared, req.exclude))
            batch.keys.append(req.state.user_id)
            batch.prints.append(prepared.fingerprint)
            batch.where.append(i)
            batch.k = max(batch.k, req.k)
        return batch
