"""Batched UGT inference for serving: packed rows in, top-k items out; fused attention, KV cache, CUDA graphs.

Why each piece:
* **One host-to-device copy per batch.** Every request's model row (``models.data.history_row``) and its
  excluded item indices are packed into one int64 (B, W) tensor in pinned memory and copied once.
* **Prefill** runs the whole stack on the padded batch (``UGT.sequence_inputs`` embeds exactly as training),
  with the Triton HSTU attention (bias computed in the kernel) where it runs, else the PyTorch reference.
* **KV cache of the user prefix.** HSTU attention is causal, so the keys/values of every position before
  the last event depend only on the user's past, never on the request time. With ``cache_slots > 0`` a
  prefill keeps each user's per-layer K/V in a slot pool; a later request whose prefix is unchanged (same
  events, only the request time differs) runs only its last token through the layers against the cached
  prefix (``decode``): O(T) per layer instead of O(T^2). A user whose window moved is prefilled again.
* **bf16 + CUDA graphs** on GPU: prefill and decode are captured once per batch bucket (e.g. 1, 8, 32, 128)
  and replayed; the batch is padded up to the bucket. The CPU path is the same code in fp32, eagerly.
* **Retrieval + constrained generation.** Exact dot-product top-k over the item table (history and
  ``exclude`` masked), and optionally the semantic-ID beam search constrained by the prefix trie; the two
  lists are merged by reciprocal rank (``merge="rrf"``). Candidates are scored against the cached user
  state in micro-batches (``score_candidates``), so a ranker can ask for any candidate set.
* **Target-aware ranking** (``rank_top > 0``, :mod:`models.ugt.ranking`): the model's ranking head reorders
  retrieval's top list (and the beam's items with ``merge="rrf"``); every candidate attends to the user's
  history read from the KV cache and to itself, M-FALCON style; one CUDA graph per batch bucket on GPU.
"""

from __future__ import annotations

import copy
import hashlib
import types
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from contracts.tokenizer import TOKEN_GROUP_ITEM
from models.hstu import bucketize_time_gaps, hstu_attention
from models.ugt.heads import PrefixTrie, TrieEdit
from models.ugt.model import UGT
from models.ugt.ranking import Prefix, candidate_logits, prefix_indices
from models.ugt.steps import attend_one as _attend_one
from models.ugt.steps import attn_inputs as _attn_inputs
from models.ugt.steps import attn_output as _attn_output

ROW_FIELDS = ("ids", "times", "query_times", "ratings", "gaps", "query_gaps")  # (B, N) each
# A decode (every row a KV-cache hit) reads only each row's last event: the compact layout per row is
# ROW_FIELDS at the last position, the length and the cache slot (then the exclusions), 8 columns, not ~6N.
COMPACT_WIDTH = len(ROW_FIELDS) + 2
RRF_K = 60.0  # reciprocal-rank fusion constant (Cormack et al.)


@dataclass
class InferenceConfig:
    device: str = "cpu"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    fused_attention: bool = True  # Triton HSTU attention where it runs (CUDA)
    cuda_graphs: bool = True  # capture prefill/decode per batch bucket (CUDA only)
    batch_buckets: tuple[int, ...] = (1, 8, 32, 128)
    cache_slots: int = 0  # users whose prefix K/V is kept (0 = no KV cache)
    beam_size: int = 0  # > 0: also semantic-ID beam search (needs the model's semantic-ID head)
    merge: str = "retrieval"  # "retrieval" (dot-product top-k only) | "rrf" (retrieval + beam, rank-fused; with
    # rank_top > 0 the ranking head orders the union of both lists instead)
    candidate_micro_batch: int = 512  # M-FALCON-style micro-batch of candidates scored at once
    compile: bool = False  # CPU: torch.compile prefill and decode at start (needs a C++ compiler; ~1 min)
    rank_top: int = 0  # > 0: the ranking head reorders this many retrieval candidates (needs heads.ranking + cache)
    new_item_slots: int = 0  # rows reserved for items that arrive after training (:meth:`UGTInference.add_items`)
    # CUDA, merge="rrf": retrieval + constrained beam search + fusion replayed as one CUDA graph per (batch bucket,
    # exclusion width, k) instead of ~150 small kernel launches; recaptured when the catalog or trie changes
    heads_graph: bool = True

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


@dataclass
class TopK:
    """One request's answer: item indices (best first) and their scores."""

    indices: np.ndarray
    scores: np.ndarray


class Pending:
    """A batch in flight (:meth:`UGTInference.submit_packed`): its top-k on the way to host memory."""

    def __init__(self, n: int, k: int, values: torch.Tensor | None, indices: torch.Tensor | None,
                 counts: torch.Tensor | None, done: torch.cuda.Event | None):
        self.n, self.k = n, k
        self.values, self.indices, self.counts, self.done = values, indices, counts, done

    @classmethod
    def empty(cls) -> Pending:
        return cls(0, 0, None, None, None, None)

    def ready(self) -> bool:
        """True once result() would not wait."""
        return self.done is None or self.done.query()

    def result(self) -> list[TopK]:
        """Wait for the batch (only this one: later batches keep running) and split it into TopKs."""
        if self.n == 0:
            return []
        if self.done is not None:
            self.done.synchronize()
        values = self.values.numpy().copy()  # copies: the pinned blocks go back to the allocator
        indices = self.indices.numpy().copy()
        counts = self.counts.numpy()
        m = np.minimum(np.minimum(self.k, counts), np.isfinite(values).sum(1))
        return [TopK(indices[b, : m[b]], values[b, : m[b]]) for b in range(self.n)]


def prefix_fingerprint(row: dict[str, np.ndarray]) -> bytes:
    """Hash of everything in a one-row input except the last position's request time: the cache key."""
    n = int(row["lengths"][0])
    h = hashlib.blake2b(digest_size=16)
    for key in ("ids", "times", "ratings", "gaps", "long_ids", "long_times"):
        h.update(np.ascontiguousarray(row[key]).tobytes())
    for key in ("query_times", "query_gaps"):
        h.update(np.ascontiguousarray(row[key][0, : max(n - 1, 0)]).tobytes())
    return h.digest()


class PrefixCache:
    """LRU of user key -> (slot, prefix fingerprint); slot ``capacity`` is scratch (never cached)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self.free = list(range(capacity - 1, -1, -1))
        self.hits = 0
        self.misses = 0

    @property
    def scratch(self) -> int:
        return self.capacity

    def assign(self, keys: list[str | None], prints: list[bytes]) -> tuple[list[int], list[bool]]:
        """(slot, hit) per row; a repeated key in one batch and ``None`` keys get the scratch slot, uncached."""
        slots, hits, seen = [], [], set()
        for key, fp in zip(keys, prints, strict=True):
            if key is None or key in seen or self.capacity == 0:
                slots.append(self.scratch)
                hits.append(False)
                continue
            seen.add(key)
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                if entry[1] == fp:
                    slots.append(entry[0])
                    hits.append(True)
                    self.hits += 1
                    continue
                slot = entry[0]
            else:
                if not self.free:
                    _, (slot_old, _) = self.entries.popitem(last=False)
                    self.free.append(slot_old)
                slot = self.free.pop()
            self.entries[key] = (slot, fp)
            slots.append(slot)
            hits.append(False)
            self.misses += 1
        return slots, hits


def _own_code(method):
    """``method`` rebound to a copy of its function with its own code object.

    torch.compile keeps compiled graphs per code object, so every UGTInference would otherwise share one cache:
    a second model in the process (the router serves several) would recompile the first one's steps, and with
    only tensor guards kept (see ``_compile``) could even reuse a graph built for another model's sizes.
    """
    f = method.__func__
    fresh = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    fresh.__kwdefaults__, fresh.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(fresh, method.__self__)


class UGTInference:
    """Serves one UGT model: ``recommend(rows, excludes, k, user_keys)`` -> a TopK per row."""

    def __init__(self, model: UGT, config: InferenceConfig | None = None):
        self.config = c = config or InferenceConfig()
        self.device = torch.device(c.device)
        self.dtype = c.torch_dtype()
        if c.merge not in ("retrieval", "rrf"):
            raise ValueError(f"merge must be 'retrieval' or 'rrf', got {c.merge!r}")
        if (c.beam_size > 0 or c.merge == "rrf") and model.sid_head is None:
            raise ValueError("beam search / rrf merge needs a model with a semantic-ID head")
        if c.rank_top > 0 and model.ranker is None:
            raise ValueError("rank_top > 0 needs a model trained with the ranking head (heads.ranking: true); "
                             "set rank_top to 0 for this checkpoint")
        if c.rank_top > 0 and c.cache_slots <= 0:
            raise ValueError("rank_top > 0 reads each user's history keys/values from the KV cache: set cache_slots > 0")
        self.model = copy.deepcopy(model).to(self.device, self.dtype).eval().requires_grad_(False)
        self.model.embed.reserve(c.new_item_slots)
        mc = self.model.config
        self.N = mc.multiscale.recent_len
        self.G = mc.multiscale.long_groups if self.model.compressor is not None else 0
        self.E = max(mc.multiscale.max_long if self.G else 0, 1)
        self.T = self.G + self.N
        self.width = 6 * self.N + 1 + 2 * self.E
        self.fused = False
        if c.fused_attention:
            from models.kernels.hstu_attention import triton_status

            self.fused = triton_status(self.device)[0] and self.device.type == "cuda"
        self.graphs_on = c.cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[tuple, tuple] = {}  # (kind, batch[, candidates]) -> (graph, static in, static out, None)
        with torch.inference_mode():
            # (capacity + 1, D), L2-normalised; rows past num_items are reserved for new items (zero until added)
            self.table = self.model.item_embeddings().to(self.dtype)
        self.num_items = self.model.embed.num_items  # items served now: the trained ones, then add_items'
        self._pinned: dict[tuple[int, int], torch.Tensor] = {}  # reused pinned staging buffers by shape
        self.cache = PrefixCache(c.cache_slots) if c.cache_slots > 0 else None
        if self.cache is not None:
            L = len(self.model.layers)
            blk = self.model.layers[0].attn
            S = c.cache_slots + 1
            # head-major (slot, head, position, dim): a decode step reads each head's keys as one matrix
            self.pool_k = torch.zeros(L, S, blk.num_heads, self.T, blk.dqk, device=self.device, dtype=self.dtype)
            self.pool_v = torch.zeros(L, S, blk.num_heads, self.T, blk.dv, device=self.device, dtype=self.dtype)
            self.pool_t = torch.zeros(S, self.T, device=self.device, dtype=torch.int64)
            self.pool_valid = torch.zeros(S, self.T, device=self.device, dtype=torch.bool)
        self.compiled = False
        if c.compile:
            self._compile()

    # ---- packing ---------------------------------------------------------------------------------

    def row_vectors(self, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
        """(n, W) int64: each one-row model input flattened into the packed layout (callers may keep these)."""
        n, N, E = len(rows), self.N, self.E
        out = np.empty((n, self.width), dtype=np.int64)
        for f, key in enumerate(ROW_FIELDS):
            out[:, f * N : (f + 1) * N] = np.concatenate([r[key] for r in rows])
        out[:, 6 * N] = np.concatenate([r["lengths"] for r in rows])
        out[:, 6 * N + 1 : 6 * N + 1 + E] = np.concatenate([r["long_ids"][:, :E] for r in rows])
        out[:, 6 * N + 1 + E :] = np.concatenate([r["long_times"][:, :E] for r in rows])
        return out

    @staticmethod
    def exclusion_matrix(excludes: list[np.ndarray]) -> np.ndarray:
        """(n, X) int64 of each row's unique excluded item indices, 0-padded; X a power of two."""
        X = max([len(e) for e in excludes] + [1])
        out = np.zeros((len(excludes), 1 << (X - 1).bit_length()), dtype=np.int64)
        for b, e in enumerate(excludes):
            out[b, : len(e)] = e
        return out

    def pack(self, vectors: np.ndarray, excl: np.ndarray, slots: list[int], pad_to: int,
             fresh: bool = False) -> torch.Tensor:
        """One int64 (pad_to, W + 1 + X) host tensor (pinned on CUDA): rows, cache slot, exclusions.

        ``fresh``: a new block from the caching host allocator, safe while earlier batches' copies are still
        queued; otherwise one reused buffer per shape (only for callers that wait for each batch).
        """
        n = len(vectors)
        shape = (pad_to, self.width + 1 + excl.shape[1])
        if self.device.type == "cuda" and fresh:
            host = torch.empty(shape, dtype=torch.int64, pin_memory=True)
        elif self.device.type == "cuda":
            host = self._pinned.get(shape)
            if host is None:
                host = self._pinned[shape] = torch.empty(shape, dtype=torch.int64, pin_memory=True)
        else:
            host = torch.empty(shape, dtype=torch.int64)
        buf = host.numpy()
        buf[:n, : self.width] = vectors
        buf[:n, self.width] = slots
        buf[:n, self.width + 1 :] = excl
        if pad_to > n:
            buf[n:] = 0
            buf[n:, self.width] = self.cache.scratch if self.cache is not None else 0
        return host

    def pack_compact(self, vectors: np.ndarray, excl: np.ndarray, slots: list[int], pad_to: int) -> torch.Tensor:
        """The decode-only host tensor (pad_to, COMPACT_WIDTH + X), fresh pinned block on CUDA: only the last
        event of each row crosses to the GPU (the rest of the prefix is in the cache)."""
        n, N = len(vectors), self.N
        shape = (pad_to, COMPACT_WIDTH + excl.shape[1])
        host = torch.empty(shape, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        buf = host.numpy()
        lengths = vectors[:, 6 * N]
        last = np.maximum(lengths - 1, 0)
        cols = np.arange(len(ROW_FIELDS)) * N + last[:, None]  # (n, 6): each field's last position
        buf[:n, : len(ROW_FIELDS)] = np.take_along_axis(vectors, cols, axis=1)
        buf[:n, len(ROW_FIELDS)] = lengths
        buf[:n, len(ROW_FIELDS) + 1] = slots
        buf[:n, COMPACT_WIDTH:] = excl
        if pad_to > n:
            buf[n:] = 0
            buf[n:, len(ROW_FIELDS) + 1] = self.cache.scratch
        return host

    def unpack(self, dev: torch.Tensor) -> dict[str, torch.Tensor]:
        N, E = self.N, self.E
        batch = {key: dev[:, f * N : (f + 1) * N] for f, key in enumerate(ROW_FIELDS)}
        batch["lengths"] = dev[:, 6 * N]
        batch["long_ids"] = dev[:, 6 * N + 1 : 6 * N + 1 + E]
        batch["long_times"] = dev[:, 6 * N + 1 + E : 6 * N + 1 + 2 * E]
        return batch

    # ---- the stack -------------------------------------------------------------------------------

    def prefill(self, buf: torch.Tensor) -> torch.Tensor:
        """Whole-sequence forward of a packed device batch; keeps K/V in the slot pool when caching."""
        user, ks, vs, times, valid = self._prefill(buf)
        if self.cache is not None:
            slots = buf[:, self.width]
            self.pool_k.index_copy_(1, slots, ks)
            self.pool_v.index_copy_(1, slots, vs)
            self.pool_t.index_copy_(0, slots, times)
            self.pool_valid.index_copy_(0, slots, valid)
        return user

    def _prefill(self, buf: torch.Tensor):
        """(user states (B, D), K and V of every layer (L, B, H, T, d) or None without a cache, times, valid).

        Pure: the slot pool is written by :meth:`prefill`. Under torch.compile an in-place write into the pool
        became a copy of the whole pool per call (~70 MB at 10,000 slots).
        """
        batch = self.unpack(buf[:, : self.width])
        x, times, query_times, valid, types = self.model.sequence_inputs(batch)
        last = len(self.model.layers) - 1
        ks, vs = [], []
        for li, layer in enumerate(self.model.layers):
            blk = layer.attn
            u, q, k, v = _attn_inputs(blk, x)
            if self.cache is not None:
                ks.append(k.transpose(1, 2))
                vs.append(v.transpose(1, 2))
            if li == last:
                user = self._last_layer(layer, x, u, q, k, v, times, query_times, valid, types, batch["lengths"])
                if self.cache is None:
                    return user, None, None, times, valid
                return user, torch.stack(ks), torch.stack(vs), times, valid
            if self.fused:
                from models.kernels.hstu_attention import RelBias, fused_hstu_attention

                rel = RelBias(blk.rab.pos_w, blk.rab.ts_w, times, query_times, blk.max_len)
                attn = fused_hstu_attention(q, k, v, valid, float(blk.max_len), rel=rel)
            else:
                attn = hstu_attention(q, k, v, blk.rab(times, query_times), valid, float(blk.max_len))
            x = _attn_output(blk, x, u, attn)
            h, _ = layer.ffn(layer.norm(x, types), valid, with_loss=False)
            x = x + h
        raise AssertionError("a UGT has at least one layer")

    def _last_layer(self, layer, x, u, q, k, v, times, query_times, valid, types, lengths) -> torch.Tensor:
        """The prefill's last layer at each row's last event only: nothing after it reads the other positions.

        Every position's K/V is still needed (the cache, and the last query attends to them), but the
        attention output, the gated projection and the FFN run on one token per row instead of T (exact).
        """
        B, T = valid.shape
        p = (self.G + lengths - 1).clamp(min=0)  # (B,) the last event's position
        at = p.view(B, 1)

        def take(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, 1, ...) at each row's p
            index = at.view(B, 1, *([1] * (t.dim() - 2))).expand(B, 1, *t.shape[2:])
            return t.gather(1, index)

        blk = layer.attn
        ar = torch.arange(T, device=valid.device)
        mask = (ar.view(1, -1) <= at) & valid
        pos_index = at - ar.view(1, -1) + blk.rab.max_len - 1
        buckets = bucketize_time_gaps(query_times.gather(1, at) - times, blk.rab.num_buckets)
        attn = _attend_one(blk, take(q), k.transpose(1, 2), v.transpose(1, 2), mask, pos_index, buckets)
        x1 = _attn_output(blk, take(x), take(u), attn)
        h, _ = layer.ffn(layer.norm(x1, types.gather(1, at)), valid.gather(1, at), with_loss=False)
        return F.normalize((x1 + h)[:, 0].float(), dim=-1, eps=1e-6)

    def last_events(self, buf: torch.Tensor, compact: bool):
        """(each row's last event as ROW_FIELDS of (B, 1), lengths, cache slots) of a :meth:`pack` buffer, or of a
        :meth:`pack_compact` one, which holds only those."""
        if compact:
            take = {key: buf[:, f : f + 1] for f, key in enumerate(ROW_FIELDS)}
            return take, buf[:, len(ROW_FIELDS)], buf[:, len(ROW_FIELDS) + 1]
        batch = self.unpack(buf[:, : self.width])
        last = (batch["lengths"] - 1).clamp(min=0).view(-1, 1)
        return {key: batch[key].gather(1, last) for key in ROW_FIELDS}, batch["lengths"], buf[:, self.width]

    def decode(self, buf: torch.Tensor) -> torch.Tensor:
        """Only each row's last event through the stack, against its cached prefix K/V (slot in the buffer)."""
        return self._decode(*self._decode_inputs(*self.last_events(buf, compact=False)))

    def decode_compact(self, buf: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` of a :meth:`pack_compact` buffer."""
        return self._decode(*self._decode_inputs(*self.last_events(buf, compact=True)))

    def _decode_inputs(self, take: dict[str, torch.Tensor], lengths: torch.Tensor, slots: torch.Tensor):
        """:meth:`_decode`'s arguments in one memory layout (contiguous, batch size dynamic when compiled)."""
        if not self.compiled:
            return take, lengths, slots
        mark = self._batch_dim_dynamic
        return {key: mark(t.contiguous()) for key, t in take.items()}, mark(lengths.contiguous()), mark(slots.contiguous())

    @staticmethod
    def _batch_dim_dynamic(t: torch.Tensor) -> torch.Tensor:
        """Tell torch.compile that dim 0 (the batch) varies: one graph for every batch size >= 2."""
        torch._dynamo.mark_dynamic(t, 0)
        return t

    def _decode(self, take: dict[str, torch.Tensor], lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self._decode_steps(take, lengths, slots)[0]

    def _decode_steps(self, take: dict[str, torch.Tensor], lengths: torch.Tensor, slots: torch.Tensor,
                      keep: bool = False) -> tuple[torch.Tensor, Prefix | None]:
        """(user states, and with ``keep`` the :class:`Prefix` a ranking candidate reads: every layer's
        cached keys/values with this request's last event in place)."""
        if self.cache is None:
            raise RuntimeError("decode needs cache_slots > 0")
        m = self.model
        B = lengths.shape[0]
        last = (lengths - 1).clamp(min=0).view(B, 1)
        p = (self.G + last).view(B)  # the last event's position in the full sequence
        types = torch.full_like(take["ids"], TOKEN_GROUP_ITEM)
        x = m.embed(take["ids"], take["ratings"], take["gaps"], types, p.view(B, 1))
        tok_valid = take["ids"] != 0
        if m.context is not None:
            x = x + m.context(take["query_times"], take["query_gaps"]) * tok_valid.unsqueeze(-1).to(x.dtype)
        times_c = self.pool_t.index_select(0, slots)
        ar = torch.arange(self.T, device=slots.device)
        mask = (ar.view(1, -1) <= p.view(-1, 1)) & self.pool_valid.index_select(0, slots)
        mask[torch.arange(B, device=slots.device), p] = tok_valid[:, 0]
        rows = torch.arange(B, device=slots.device)
        rab = m.layers[0].attn.rab  # every layer has its own tables but the same indices
        pos_index = p.view(-1, 1) - ar.view(1, -1) + rab.max_len - 1  # (B, T)
        buckets = bucketize_time_gaps(take["query_times"] - times_c, rab.num_buckets)  # (B, T)
        keys, values = [], []
        for li, layer in enumerate(m.layers):
            blk = layer.attn
            u, q, k, v = _attn_inputs(blk, x)  # q, k: (B, 1, H, dqk)
            kc = self.pool_k[li].index_select(0, slots)  # (B, H, T, dqk)
            vc = self.pool_v[li].index_select(0, slots)
            kc[rows, :, p] = k[:, 0]
            vc[rows, :, p] = v[:, 0]
            if keep:
                keys.append(kc)
                values.append(vc)
            x = _attn_output(blk, x, u, _attend_one(blk, q, kc, vc, mask, pos_index, buckets))
            h, _ = layer.ffn(layer.norm(x, types), tok_valid, with_loss=False)
            x = x + h
        user = F.normalize(x[:, 0].float(), dim=-1, eps=1e-6)
        if not keep:
            return user, None
        request_time = take["query_times"][:, 0]
        valid_c = self.pool_valid.index_select(0, slots).clone()
        valid_c[rows, p] = tok_valid[:, 0]
        key_mask, pos_index_c, buckets_c, last_time = prefix_indices(rab.max_len, rab.num_buckets, times_c, valid_c,
                                                                     p + 1, request_time)
        return user, Prefix(keys, values, key_mask, pos_index_c, buckets_c, request_time, last_time)

    def rank(self, dev: torch.Tensor, compact: bool, cands: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """(B, C) target-aware logits of candidate items for the rows of a device batch (M-FALCON micro-batches).

        The history's keys/values come from the KV cache (a miss was just prefilled into its slot); the last
        event is run again at this request's time, then every candidate attends to the history and itself.
        """
        _, prefix = self._decode_steps(*self.last_events(dev, compact), keep=True)
        return candidate_logits(self.model, prefix, cands, user, self.table, self.config.candidate_micro_batch)

    def _run(self, kind: str, buf: torch.Tensor) -> torch.Tensor:
        """prefill/decode of a device batch, through a captured CUDA graph when on."""
        fn = {"prefill": self.prefill, "decode": self.decode, "decode_compact": self.decode_compact}[kind]
        # the stack never reads the exclusions: one graph per kind and batch size
        buf = buf[:, :COMPACT_WIDTH] if kind == "decode_compact" else buf[:, : self.width + 1]
        if self.compiled:  # one memory layout whatever the exclusion width, so the compiled code's guards hold
            return fn(self._batch_dim_dynamic(buf.contiguous()))
        if not self.graphs_on:
            return fn(buf)
        key = (kind, buf.shape[0])
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn, buf)
        return self._replay(self.graphs[key], buf)

    @staticmethod
    def _replay(captured: tuple, *inputs: torch.Tensor) -> torch.Tensor:
        """Copy ``inputs`` into a captured graph's static inputs, replay it; its static output."""
        graph, static_in, static_out, _ = captured
        for dst, src in zip(static_in, inputs, strict=True):
            dst.copy_(src)
        graph.replay()
        return static_out

    def _capture(self, fn, *inputs: torch.Tensor):
        """(graph, static inputs, static output, None): ``fn`` captured on static copies of ``inputs``."""
        static_in = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(*static_in)
        return graph, static_in, static_out, None

    def bucket(self, n: int) -> int:
        """The smallest batch bucket >= n (n itself past the largest, or without graphs; >= 2 when compiled)."""
        if not self.graphs_on:
            return max(n, 2) if self.compiled else n
        for size in sorted(self.config.batch_buckets):
            if size >= n:
                return size
        return n

    def _compile(self) -> None:
        """torch.compile prefill and the decode step, and compile them now (a dummy batch of two rows).

        On CPU a served batch is hundreds of small ops whose dispatch costs more than their arithmetic;
        inductor fuses them, and its C++ wrapper launches the kernels without Python (measured: docs/SERVING.md).
        Compiling at start keeps it off the first requests and lets a forked engine process inherit the code.
        Only the batch dimension is dynamic; a batch of one is padded to two (PyTorch specializes size 1), so one
        graph per step serves every batch size.
        """
        import shutil

        if self.device.type != "cpu":
            raise ValueError("compile is for the CPU path; on CUDA, cuda_graphs replay the captured steps instead")
        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            raise ValueError("compile needs a C++ compiler on PATH (g++ or clang++; e.g. apt-get install g++)")
        import torch._inductor.config as inductor

        inductor.compile_threads = 1  # no compile worker pool: the serving engine is forked after start-up
        # Guards: only the inputs' tensor properties. The rest (weights, cache pools, config ints) is fixed after
        # start-up, and checking it cost ~0.3 ms a call, as much as the compiled decode itself.
        options: dict[str, object] = {"cpp_wrapper": True}
        keep_tensor_guards = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)  # PyTorch 2.8+
        if keep_tensor_guards is not None:
            options["guard_filter_fn"] = keep_tensor_guards
        self._prefill = torch.compile(_own_code(self._prefill), options=options)  # type: ignore[method-assign]
        if self.cache is not None:
            self._decode = torch.compile(_own_code(self._decode), options=options)  # type: ignore[method-assign]
        self.compiled = True
        rows = np.zeros((2, self.width), dtype=np.int64)
        rows[:, 0] = 1  # item 1 at position 0
        rows[:, 6 * self.N] = 1  # length 1
        scratch = self.cache.scratch if self.cache is not None else 0
        with torch.inference_mode():
            dev = self.pack(rows, np.zeros((2, 1), np.int64), [scratch, scratch], 2)  # CPU only: already there
            self._run("prefill", dev)
            if self.cache is not None:
                self._run("decode", dev)
                self._run("decode_compact", self.pack_compact(rows, np.zeros((2, 1), np.int64), [scratch] * 2, 2))

    # ---- the live catalog ------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The most items this engine can serve: the trained ones plus ``new_item_slots``."""
        return self.model.embed.capacity

    @torch.inference_mode()
    def add_items(self, codes: np.ndarray | None, genres: np.ndarray, years: np.ndarray,
                  trie: PrefixTrie | None = None, trie_edits: Sequence[TrieEdit] = ()) -> np.ndarray:
        """Serve ``n`` items that arrived after training; returns their indices (num_items + 1 ...).

        Each new item is embedded from its semantic-ID ``codes`` (n, L) and metadata (``genres`` (n, G) genre
        indices, ``years`` (n,) decade buckets), with no ID row: retrieval scores it, the ranking head can rank
        it, and ``trie`` (the prefix trie over every served item, built by the caller off this thread) lets the
        beam search generate it; ``trie_edits`` (from :meth:`PrefixTrie.add`) are then written into the served
        trie in place. Rows are written in place, so CUDA graphs and compiled steps stay valid.
        """
        n = len(years)
        start = self.num_items + 1
        if self.num_items + n > self.capacity:
            raise ValueError(f"the engine serves {self.num_items:,} items and has room for {self.capacity:,}: "
                             "raise new_item_slots, or retrain so the new items get trained rows")
        ids = torch.arange(start, start + n, device=self.device)
        self.model.embed.set_items(ids, codes, genres, years)
        self.table[ids] = self.model.embed.output_vectors(ids).to(self.dtype)
        if trie is not None and self.model.sid_head is not None:
            self.model.trie = trie.to(self.device)
        if trie_edits and self.model.sid_head is not None and self.model.trie is not None:
            for edit in trie_edits:
                self.model.trie.apply(edit)
        self.num_items += n
        return ids.cpu().numpy()

    # ---- heads -----------------------------------------------------------------------------------

    def users(self, host: torch.Tensor, hits: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(user states (B, D) fp32, the device buffer): one H2D copy, prefill and/or decode by cache hit."""
        dev = host.to(self.device, non_blocking=True)
        n = len(hits)
        if self.cache is None or not any(hits):
            return self._run("prefill", dev), dev
        if all(hits):
            return self._run("decode", dev), dev
        out = torch.empty(dev.shape[0], self.model.config.d_model, device=self.device)
        hit_idx = [i for i, h in enumerate(hits) if h]
        miss_idx = [i for i in range(n) if not hits[i]]
        for kind, idx in (("decode", hit_idx), ("prefill", miss_idx)):
            sel = torch.as_tensor(idx, device=self.device)
            sub = dev.index_select(0, sel)
            size = self.bucket(len(idx))
            if size > len(idx):
                pad = sub[:1].expand(size - len(idx), -1).clone()
                pad[:, self.width] = self.cache.scratch
                sub = torch.cat([sub, pad])
            out[sel] = self._run(kind, sub)[: len(idx)]
        return out, dev

    def exclusions(self, dev: torch.Tensor) -> torch.Tensor:
        """The exclusion columns of a :meth:`pack` device buffer."""
        return dev[:, self.width + 1 :]

    def retrieve(self, user: torch.Tensor, excl: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k (scores, indices) over the table with padding, history and exclusions (B, X) masked, + valid counts."""
        scores = user.to(self.dtype) @ self.table[: self.num_items + 1].T  # (B, V + 1), model dtype (bf16 on GPU)
        scores.scatter_(1, excl, float("-inf"))  # exclusions are unique per row; index 0 pads them
        scores[:, 0] = float("-inf")
        counts = self.num_items - (excl > 0).sum(1)
        top = scores.topk(min(k, self.num_items), dim=1)
        return top.values.float(), top.indices, counts

    def generate(self, user: torch.Tensor, excl: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained semantic-ID beam search: (items (B, beam), log-probs), excluded items dropped (-inf)."""
        items, logp = self.model.generate(user.to(self.dtype), beam)
        banned = (items.unsqueeze(-1) == excl.unsqueeze(1)).any(-1) | (items == 0)
        return items, logp.masked_fill(banned, float("-inf"))

    @torch.inference_mode()
    def score_candidates(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of given candidate items (B, C) against the users' states, in micro-batches of C."""
        out = torch.empty(candidates.shape, device=self.device, dtype=torch.float32)
        M = self.config.candidate_micro_batch
        u = user.to(self.dtype).unsqueeze(1)
        for start in range(0, candidates.shape[1], M):
            chunk = candidates[:, start : start + M]
            out[:, start : start + M] = (self.table[chunk] * u).sum(-1).float()
        return out

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
        retrieval, and the D2H copies of the top-k into fresh pinned buffers (PyTorch's caching host
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
            slots, hits = self.cache.assign(list(keys), list(prints))
        else:
            slots, hits = [0] * n, [False] * n
        if self.cache is not None and all(hits):  # decode only: the last events cross, not the whole rows
            dev = self.pack_compact(vectors, excl, slots, self.bucket(n)).to(self.device, non_blocking=True)
            user, excl_dev = self._run("decode_compact", dev), dev[:, COMPACT_WIDTH:]
        else:
            user, dev = self.users(self.pack(vectors, excl, slots, self.bucket(n), fresh=True), hits)
            excl_dev = self.exclusions(dev)
        if self.config.rank_top > 0:  # on the padded batch: one captured graph per bucket
            values, indices, counts = (t[:n] for t in self._ranked(dev, self.cache is not None and all(hits), user,
                                                                  excl_dev, k))
        else:
            values, indices, counts = self._heads(user, excl_dev, k, n)
        if self.device.type != "cuda":
            return Pending(n, k, values, indices, counts, None)
        out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (values, indices, counts)]
        for dst, src in zip(out, (values, indices, counts), strict=True):
            dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Pending(n, k, *out, done)

    def _heads(self, user: torch.Tensor, excl: torch.Tensor, k: int, n: int):
        """Retrieval, and with ``merge="rrf"`` the beam search and the fusion, for the first ``n`` rows of a padded
        batch: (scores, items, valid counts).

        On CUDA with ``heads_graph`` the rrf path is one captured graph per (batch bucket, exclusion width rounded up
        to a power of two, k). Its key also holds the catalog size and the trie, which :meth:`add_items` changes, so
        a grown catalog is captured again on its first batch (the stale graphs are dropped then).
        """
        if not (self.graphs_on and self.config.heads_graph and self.config.merge == "rrf"):
            return self._retrieve_merged(user[:n], excl[:n], k)
        width = max(8, 1 << (excl.shape[1] - 1).bit_length())
        if width > excl.shape[1]:  # index 0 is the padding item, masked anyway
            excl = F.pad(excl, (0, width - excl.shape[1]))
        catalog = (self.num_items, id(self.model.trie))
        key = ("heads", user.shape[0], width, k, catalog)
        if key not in self.graphs:
            for stale in [g for g in self.graphs if g[0] == "heads" and g[4] != catalog]:
                del self.graphs[stale]

            self.graphs[key] = self._capture(lambda u, x: self._retrieve_merged(u, x, k), user, excl)
        values, indices, counts = self._replay(self.graphs[key], user, excl)
        return values[:n], indices[:n], counts[:n]

    def _retrieve_merged(self, user: torch.Tensor, excl: torch.Tensor, k: int):
        """Retrieval's top k, fused with the beam search's list when ``merge="rrf"``: (scores, items, counts)."""
        values, indices, counts = self.retrieve(user, excl, k)
        if self.config.merge == "rrf":
            values, indices = self._rrf(user, excl, indices, k)
        return values, indices, counts

    def _ranked(self, dev: torch.Tensor, compact: bool, user: torch.Tensor, excl: torch.Tensor, k: int):
        """Retrieval's top ``rank_top`` (with ``merge="rrf"``: and the beam search's items) reordered by the ranking
        head: (logits, items, valid counts) of the top k."""
        values, cands, counts = self.retrieve(user, excl, max(k, self.config.rank_top))
        invalid = torch.isinf(values)
        if self.config.merge == "rrf":  # rank the union: a beam item retrieval also found is dropped (item 0)
            beam_items, beam_logp = self.generate(user, excl, max(self.config.beam_size, k))
            dup = (beam_items.unsqueeze(-1) == cands.unsqueeze(1)).any(-1) | torch.isinf(beam_logp)
            cands = torch.cat([cands, beam_items.masked_fill(dup, 0)], dim=1)
            invalid = torch.cat([invalid, dup], dim=1)
        logits = self._rank_run(dev, compact, cands, user).masked_fill(invalid, float("-inf"))
        top = logits.topk(min(k, cands.shape[1]), dim=1)
        return top.values, cands.gather(1, top.indices), counts

    def _rank_run(self, dev: torch.Tensor, compact: bool, cands: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """:meth:`rank`, through a CUDA graph captured per (layout, batch, candidates) when graphs are on."""
        dev = dev[:, :COMPACT_WIDTH] if compact else dev[:, : self.width + 1]  # the exclusions are not read
        if not self.graphs_on:
            return self.rank(dev, compact, cands, user)
        key = ("rank_compact" if compact else "rank", dev.shape[0], cands.shape[1])
        inputs = (dev, cands, user)
        if key not in self.graphs:
            self.graphs[key] = self._capture(lambda d, c, u: self.rank(d, compact, c, u), *inputs)
        return self._replay(self.graphs[key], *inputs)

    def _rrf(self, user: torch.Tensor, excl: torch.Tensor, ret_idx: torch.Tensor, k: int):
        """Reciprocal-rank fusion of the retrieval list and the beam-search list (scores: fused RRF)."""
        beam = max(self.config.beam_size, k)
        gen_idx, gen_logp = self.generate(user, excl, beam)
        B = user.shape[0]
        ranks = torch.arange(1, ret_idx.shape[1] + 1, device=self.device, dtype=torch.float32)
        fused = torch.zeros(B, self.num_items + 1, device=self.device)
        fused.scatter_add_(1, ret_idx, (1.0 / (RRF_K + ranks)).expand(B, -1).contiguous())
        granks = torch.arange(1, gen_idx.shape[1] + 1, device=self.device, dtype=torch.float32).expand(B, -1)
        contrib = torch.where(torch.isfinite(gen_logp), 1.0 / (RRF_K + granks), torch.zeros_like(granks))
        fused.scatter_add_(1, gen_idx, contrib)
        fused[:, 0] = 0
        top = fused.topk(min(k, self.num_items), dim=1)
        values = top.values.masked_fill(top.values <= 0, float("-inf"))
        return values, top.indices
