"""Batched UGT inference for serving: packed rows in, top-k items out; fused attention, KV cache, CUDA graphs.

:class:`UGTInference` is a thin facade over the runner (:mod:`models.ugt.runner`), split as vLLM splits its
model runner, one job per module:

* **Input batch** (:mod:`.runner.batch`): every request's model row (``models.data.history_row``) and its
  excluded item indices packed into one int64 (B, W) tensor in pinned memory and copied once; an all-hit batch
  sends only each row's last event.
* **KV/slot cache** (:mod:`.runner.slot_cache`): with ``cache_slots > 0`` a prefill keeps each user's per-layer
  K/V in a slot (the pool within ``cache_bytes``); a later request whose prefix is unchanged runs only its last
  token (``decode``, a hit); one whose history extends the cached row runs only the new events (``append``,
  :mod:`.runner.append`); anything else is prefilled again (a miss).
* **The stack** (:mod:`.runner.stack`): prefill and decode, Triton HSTU attention where it runs; bf16 on GPU,
  fp32 on CPU (eager, or torch.compile'd with :mod:`.runner.compiled`).
* **Graphs** (:mod:`.runner.graphs`): each step captured once per batch descriptor (e.g. buckets 1, 8, 32, 128)
  and replayed; the batch is padded up to the bucket.
* **Heads** (:mod:`.runner.head_runner`): retrieval, the semantic-ID beam search constrained by the prefix
  trie, their reciprocal-rank merge (``merge="rrf"``), and target-aware ranking (``rank_top > 0``).
* **Catalog** (:mod:`.runner.catalog`): the item table and the items added while serving.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from models.kernels.hstu_attention import triton_status
from models.ugt.heads import PrefixTrie, TrieEdit
from models.ugt.model import UGT
from models.ugt.quantize import quantize_int8
from models.ugt.runner.append import suffix_width
from models.ugt.runner.batch import (
    COMPACT_WIDTH,
    ROW_FIELDS,
    BatchLayout,
    exclusion_matrix,
    prefix_fingerprint,
)
from models.ugt.runner.catalog import ItemCatalog
from models.ugt.runner.config import InferenceConfig
from models.ugt.runner.graphs import BatchDescriptor, CapturedGraph, GraphDispatcher
from models.ugt.runner.head_runner import HeadRunner
from models.ugt.runner.merge import RRF_K
from models.ugt.runner.outputs import Pending, TopK
from models.ugt.runner.slot_cache import APPEND, HIT, MISS, PrefixCache, SlotPool
from models.ugt.runner.stack import StackRunner
from models.ugt.weight_quant import SCHEMES as WEIGHT_SCHEMES
from models.ugt.weight_quant import QuantizedLayers, quantize_weights

__all__ = ["APPEND", "COMPACT_WIDTH", "HIT", "MISS", "ROW_FIELDS", "RRF_K", "BatchDescriptor", "InferenceConfig",
           "Pending", "PrefixCache", "TopK", "UGTInference", "prefix_fingerprint"]


class UGTInference:
    """Serves one UGT model: ``recommend(rows, excludes, k, user_keys)`` -> a TopK per row."""

    def __init__(self, model: UGT, config: InferenceConfig | None = None):
        self.config = c = config or InferenceConfig()
        c.check(model)
        self.device = torch.device(c.device)
        self.dtype = c.torch_dtype()
        self.model = copy.deepcopy(model).to(self.device, self.dtype).eval().requires_grad_(False)
        self.quantized: QuantizedLayers | None = None  # fp8 / int8_weight: which Linears were quantized
        if c.quantize == "int8":
            quantize_int8(self.model)
        elif c.quantize in WEIGHT_SCHEMES:
            self.quantized = quantize_weights(self.model, c.quantize)
        self.model.embed.reserve(c.new_item_slots)
        ms = self.model.config.multiscale
        self.N = ms.recent_len
        self.G = ms.long_groups if self.model.compressor is not None else 0
        self.E = max(ms.max_long if self.G else 0, 1)
        self.T = self.G + self.N
        blk = self.model.layers[0].attn
        self.slot_bytes = SlotPool.slot_bytes(len(self.model.layers), blk.num_heads, self.T, blk.dqk, blk.dv,
                                              self.dtype)
        slots = self.cache_slots_within(c)
        self.cache = PrefixCache(slots, self.slot_bytes, c.cache_admission) if slots > 0 else None
        self.layout = BatchLayout(self.N, self.E, self.device, self.cache.scratch if self.cache is not None else 0)
        self.width = self.layout.width
        self.fused = c.fused_attention and self.device.type == "cuda" and triton_status(self.device)[0]
        self.graphs_on = c.cuda_graphs and self.device.type == "cuda"
        self.dispatcher = GraphDispatcher(self.graphs_on, c.batch_buckets)
        self.catalog = ItemCatalog(self.model, self.dtype)
        pool = None
        if self.cache is not None:
            pool = SlotPool(len(self.model.layers), slots, blk.num_heads, self.T, blk.dqk, blk.dv, self.device,
                            self.dtype)
        self.stack = StackRunner(self.model, self.layout, pool, self.G, self.fused, self.dispatcher,
                                 c.eager_prefill_activations, c.paged_attention)
        self.heads = HeadRunner(c, self.catalog, self.layout, self.stack, self.dispatcher, self.dtype)
        if c.compile:
            self.stack.compile()

    def cache_slots_within(self, c: InferenceConfig) -> int:
        """``cache_slots``, fewer when the pool (slots + scratch, :attr:`slot_bytes` each) must fit ``cache_bytes``."""
        if c.cache_slots <= 0 or c.cache_bytes <= 0:
            return max(c.cache_slots, 0)
        fit = c.cache_bytes // self.slot_bytes - 1  # one slot is scratch
        if fit < 1:
            raise ValueError(f"cache_bytes {c.cache_bytes} holds no user: one slot is {self.slot_bytes} bytes "
                             f"(every layer's K/V over {self.T} positions) and the pool needs one more as scratch; "
                             f"set it to at least {2 * self.slot_bytes}, or 0 for no byte budget")
        return min(c.cache_slots, fit)

    # ---- what the parts hold -----------------------------------------------------------------------

    @property
    def graphs(self) -> dict[BatchDescriptor, CapturedGraph]:
        """The captured CUDA graphs by :class:`BatchDescriptor`."""
        return self.dispatcher.graphs

    @property
    def compiled(self) -> bool:
        return self.stack.compiled

    @property
    def table(self) -> torch.Tensor:
        """(capacity + 1, D) L2-normalised item output vectors; rows past ``num_items`` are reserved."""
        return self.catalog.table

    @property
    def num_items(self) -> int:
        return self.catalog.num_items

    @property
    def capacity(self) -> int:
        """The most items this engine can serve: the trained ones plus ``new_item_slots``."""
        return self.catalog.capacity

    def add_items(self, codes: np.ndarray | None, genres: np.ndarray, years: np.ndarray,
                  trie: PrefixTrie | None = None, trie_edits: Sequence[TrieEdit] = ()) -> np.ndarray:
        """Serve items that arrived after training (:meth:`ItemCatalog.add_items`); returns their indices."""
        return self.catalog.add_items(codes, genres, years, trie, trie_edits)

    # ---- packing -----------------------------------------------------------------------------------

    def row_vectors(self, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
        """(n, W) int64: each one-row model input flattened into the packed layout (callers may keep these)."""
        return self.layout.row_vectors(rows)

    exclusion_matrix = staticmethod(exclusion_matrix)

    def pack(self, vectors: np.ndarray, excl: np.ndarray, slots: list[int], pad_to: int,
             fresh: bool = False) -> torch.Tensor:
        """One int64 (pad_to, W + 1 + X) host tensor: rows, cache slot, exclusions (:meth:`BatchLayout.pack`)."""
        return self.layout.pack(vectors, excl, slots, pad_to, fresh)

    def pack_compact(self, vectors: np.ndarray, excl: np.ndarray, slots: list[int], pad_to: int) -> torch.Tensor:
        """The decode-only host tensor: each row's last event, slot and exclusions."""
        return self.layout.pack_compact(vectors, excl, slots, pad_to)

    def exclusions(self, dev: torch.Tensor, compact: bool = False) -> torch.Tensor:
        """The exclusion columns of a packed device buffer."""
        return self.layout.exclusions(dev, compact)

    def bucket(self, n: int) -> int:
        """The padded batch size of n rows: a graph bucket on CUDA, >= 2 when compiled (size 1 is specialised)."""
        return self.dispatcher.bucket(n, minimum=2 if self.compiled else 1)

    # ---- the steps ---------------------------------------------------------------------------------

    def step(self, kind: str, buf: torch.Tensor) -> torch.Tensor:
        """User states of a device batch by ``kind`` ("prefill", "decode", "decode_compact")."""
        return self.stack.run(kind, buf)

    def users(self, host: torch.Tensor, kinds: Sequence[str], starts: Sequence[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(user states (B, D) fp32, the device buffer): one H2D copy, then decode (hit), append (from ``starts``)
        and/or prefill (miss) by each row's kind. A batch with appends runs its hits in the append step (an append
        of their last event alone; the slot then holds that event's K/V at this request time, which later steps
        recompute anyway): one graph fewer per mixed batch."""
        dev = host.to(self.device, non_blocking=True)
        if self.cache is None or all(kind == MISS for kind in kinds):
            n = len(kinds)
            if n < dev.shape[0] and self.stack.eager_prefill(n):  # the padding rows' answers are never read
                user = torch.zeros(dev.shape[0], self.model.config.d_model, device=self.device)
                user[:n] = self.step("prefill", dev[:n])
                return user, dev
            return self.step("prefill", dev), dev
        if all(kind == HIT for kind in kinds):
            return self.step("decode", dev), dev
        if HIT in kinds and APPEND in kinds:  # one step for both: a hit is an append of its last event alone
            starts = [int(host[i, 6 * self.N]) - 1 if kind == HIT else s
                      for i, (kind, s) in enumerate(zip(kinds, starts or [0] * len(kinds), strict=True))]
            kinds = [APPEND if kind == HIT else kind for kind in kinds]
        out = torch.empty(dev.shape[0], self.model.config.d_model, device=self.device)
        # Hits and appends read their slots before the misses write: a miss in this batch may have evicted (and
        # now prefills into) the slot of a user looked up earlier in it when the batch has more users than slots.
        for kind in (HIT, APPEND, MISS):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if not idx:
                continue
            sel = self._index(idx)
            sub = dev.index_select(0, sel)
            if not (kind == MISS and self.stack.eager_prefill(len(idx))):
                sub = self._sub_batch(sub, len(idx))
            if kind == APPEND:
                if starts is None:
                    raise ValueError("appended rows need their starts (PrefixCache.lookup)")
                first = [starts[i] for i in idx]
                longest = max(int(host[i, 6 * self.N]) - first[j] for j, i in enumerate(idx))
                first += first[:1] * (sub.shape[0] - len(idx))
                width = suffix_width(longest, self.graphs_on)
                out[sel] = self.stack.run_append(sub, self._index(first), width)[: len(idx)]
            else:
                out[sel] = self.step("decode" if kind == HIT else "prefill", sub)[: len(idx)]
        return out, dev

    def _index(self, values: Sequence[int]) -> torch.Tensor:
        """A small int64 tensor on the device, queued on the stream from pinned memory: ``torch.as_tensor(...,
        device=cuda)`` copies from pageable memory, which waits for the GPU and so for the batch in flight."""
        host = torch.tensor(values, dtype=torch.int64)
        return host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host

    def _sub_batch(self, sub: torch.Tensor, n: int) -> torch.Tensor:
        """``sub`` padded to its bucket with copies of its first row writing to the scratch slot."""
        size = self.bucket(n)
        if size == n:
            return sub
        pad = sub[:1].expand(size - n, -1).clone()
        pad[:, self.width] = self.cache.scratch
        return torch.cat([sub, pad])

    def retrieve(self, user: torch.Tensor, excl: torch.Tensor, k: int):
        """Top-k (scores, indices) over the served items, exclusions masked, + valid counts per row."""
        return self.heads.retrieve(user, excl, k)

    def generate(self, user: torch.Tensor, excl: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained semantic-ID beam search: (items (B, beam), log-probs), excluded items at -inf."""
        return self.heads.generate(user, excl, beam)

    def rrf(self, user: torch.Tensor, excl: torch.Tensor, ret_idx: torch.Tensor, k: int):
        """Retrieval's list ``ret_idx`` fused with the beam search's by reciprocal rank: (scores, items)."""
        return self.heads.rrf(user, excl, ret_idx, k)

    @torch.inference_mode()
    def score_candidates(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of given candidate items (B, C) against the users' states, in micro-batches of C."""
        return self.heads.score_candidates(user, candidates)

    # ---- serving -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def recommend(self, rows: list[dict[str, np.ndarray]], excludes: list[np.ndarray], k: int,
                  user_keys: list[str | None] | None = None, prints: list[bytes] | None = None) -> list[TopK]:
        """Top-k item indices per row (history/exclusions never returned), one padded batch.

        ``excludes`` hold unique item indices per row. ``user_keys`` name the rows for the KV cache;
        ``prints`` are their prefix fingerprints (default: :func:`prefix_fingerprint`; a caller that knows
        the state's version can pass something cheaper).
        """
        if not rows:
            return []
        if self.cache is not None and prints is None:
            prints = [prefix_fingerprint(r) for r in rows]
        return self.recommend_packed(self.row_vectors(rows), self.exclusion_matrix(excludes), k, user_keys, prints)

    @torch.inference_mode()
    def recommend_packed(self, vectors: np.ndarray, excl: np.ndarray, k: int,
                         user_keys: list[str | None] | None = None, prints: list[bytes] | None = None) -> list[TopK]:
        """:meth:`recommend` from rows already in the packed layout (:meth:`row_vectors`, :meth:`exclusion_matrix`)."""
        return self.submit_packed(vectors, excl, k, user_keys, prints).result()

    @torch.inference_mode()
    def submit_packed(self, vectors: np.ndarray, excl: np.ndarray, k: int,
                      user_keys: list[str | None] | None = None, prints: list[bytes] | None = None) -> Pending:
        """Start one batch and return at once (on CUDA the GPU works while the caller packs the next batch).

        Everything after the pack is queued on the current stream: one H2D copy, the stack (graph replay),
        the heads, and the D2H copies of the top-k into fresh pinned buffers (PyTorch's caching host
        allocator keeps a pinned block from reuse until the copies that read or wrote it are done). Batches
        are stream-ordered, so a later batch's prefill may reuse a slot an earlier batch reads.
        """
        n = len(vectors)
        if n == 0:
            return Pending.empty()
        keys = user_keys if user_keys is not None else [None] * n
        if self.cache is not None:
            if prints is None:
                raise ValueError("packed rows need their prefix fingerprints when the KV cache is on")
            slots, kinds, starts = self.cache.lookup(list(keys), list(prints), vectors[:, 6 * self.N],
                                                     lambda b, m: self.layout.committed_print(vectors[b], m))
        else:
            slots, kinds, starts = [0] * n, [MISS] * n, [0] * n
        compact = self.cache is not None and all(kind == HIT for kind in kinds)
        if compact:  # decode only: the last events cross, not the whole rows
            dev = self.pack_compact(vectors, excl, slots, self.bucket(n)).to(self.device, non_blocking=True)
            user = self.step("decode_compact", dev)
        else:
            user, dev = self.users(self.pack(vectors, excl, slots, self.bucket(n), fresh=True), kinds, starts)
        values, indices, counts = self.heads.top_k(dev, compact, user, self.exclusions(dev, compact), k, n)
        return Pending.to_host(n, k, values, indices, counts)
