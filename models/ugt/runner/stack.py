"""The layer stack over a packed batch: prefill (whole sequences, K/V kept in the slot pool) and decode (each
row's last event against its cached prefix).

Prefill runs the whole stack on the padded batch (``UGT.sequence_inputs`` embeds exactly as training), with the
Triton HSTU attention (bias computed in the kernel) where it runs, else the PyTorch reference. A decode runs
one token per row through the layers: O(T) per layer instead of O(T^2). The same code runs in fp32 on CPU,
eagerly or compiled (:mod:`models.ugt.runner.compiled`), and in bf16 on CUDA through captured graphs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from contracts.tokenizer import TOKEN_GROUP_ITEM
from models.kernels.hstu_attention import RelBias, fused_hstu_attention
from models.kernels.reference import bucketize_time_gaps, hstu_attention
from models.kernels.slot_attention import slot_attention
from models.ugt.model import UGT
from models.ugt.ranking import Prefix, prefix_indices
from models.ugt.runner.append import append_step
from models.ugt.runner.batch import BatchLayout
from models.ugt.runner.compiled import batch_dim_dynamic, check_can_compile, compile_step
from models.ugt.runner.graphs import BatchDescriptor, GraphDispatcher
from models.ugt.runner.slot_cache import SlotPool
from models.ugt.steps import attend_one, attn_inputs, attn_output

STEPS = ("prefill", "decode", "decode_compact")


class StackRunner:
    """Runs ``model``'s layers on :class:`BatchLayout` buffers; ``pool`` holds the cached prefixes (or None)."""

    def __init__(self, model: UGT, layout: BatchLayout, pool: SlotPool | None, long_groups: int, fused: bool,
                 dispatcher: GraphDispatcher, eager_prefill_activations: int = 0, paged: bool = False):
        self.model, self.layout, self.pool = model, layout, pool
        self.G = long_groups
        self.T = long_groups + layout.N
        self.fused = fused
        self.dispatcher = dispatcher
        self.compiled = False
        self.eager_prefill_activations = eager_prefill_activations
        self.paged = paged  # cached steps attend to the pool in place (models/kernels/slot_attention.py)

    def eager_prefill(self, rows: int) -> bool:
        """Whether a prefill of ``rows`` rows runs eagerly and unpadded (graphs on, and at least
        ``eager_prefill_activations`` elements of activations: :class:`.config.InferenceConfig`)."""
        size = rows * self.T * self.model.config.d_model
        return self.dispatcher.enabled and 0 < self.eager_prefill_activations <= size

    # ---- prefill -----------------------------------------------------------------------------------

    def prefill(self, buf: torch.Tensor) -> torch.Tensor:
        """Whole-sequence forward of a packed device batch; keeps K/V in the slot pool when caching."""
        user, ks, vs, times, valid = self._prefill(buf)
        if self.pool is not None:
            self.pool.write(buf[:, self.layout.width], ks, vs, times, valid)
        return user

    def _prefill(self, buf: torch.Tensor):
        """(user states (B, D), K and V of every layer (L, B, H, T, d) or None without a cache, times, valid).

        Pure: the slot pool is written by :meth:`prefill`. Under torch.compile an in-place write into the pool
        became a copy of the whole pool per call (~70 MB at 10,000 slots).
        """
        batch = self.layout.unpack(buf[:, : self.layout.width])
        x, times, query_times, valid, types = self.model.sequence_inputs(batch)
        last = len(self.model.layers) - 1
        ks, vs = [], []
        for li, layer in enumerate(self.model.layers):
            blk = layer.attn
            u, q, k, v = attn_inputs(blk, x)
            if self.pool is not None:
                ks.append(k.transpose(1, 2))
                vs.append(v.transpose(1, 2))
            if li == last:
                user = self._last_layer(layer, x, u, q, k, v, times, query_times, valid, types, batch["lengths"])
                if self.pool is None:
                    return user, None, None, times, valid
                return user, torch.stack(ks), torch.stack(vs), times, valid
            if self.fused:
                rel = RelBias(blk.rab.pos_w, blk.rab.ts_w, times, query_times, blk.max_len)
                attn = fused_hstu_attention(q, k, v, valid, float(blk.max_len), rel=rel)
            else:
                attn = hstu_attention(q, k, v, blk.rab(times, query_times), valid, float(blk.max_len))
            x = attn_output(blk, x, u, attn)
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
        attn = attend_one(blk, take(q), k.transpose(1, 2), v.transpose(1, 2), mask, pos_index, buckets)
        x1 = attn_output(blk, take(x), take(u), attn)
        h, _ = layer.ffn(layer.norm(x1, types.gather(1, at)), valid.gather(1, at), with_loss=False)
        return F.normalize((x1 + h)[:, 0].float(), dim=-1, eps=1e-6)

    # ---- decode ------------------------------------------------------------------------------------

    def decode(self, buf: torch.Tensor) -> torch.Tensor:
        """Only each row's last event through the stack, against its cached prefix K/V (slot in the buffer)."""
        return self._decode(*self._decode_inputs(*self.layout.last_events(buf, compact=False)))

    def decode_compact(self, buf: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` of a :meth:`BatchLayout.pack_compact` buffer."""
        return self._decode(*self._decode_inputs(*self.layout.last_events(buf, compact=True)))

    def _decode_inputs(self, take: dict[str, torch.Tensor], lengths: torch.Tensor, slots: torch.Tensor):
        """:meth:`_decode`'s arguments in one memory layout (contiguous, batch size dynamic when compiled)."""
        if not self.compiled:
            return take, lengths, slots
        mark = batch_dim_dynamic
        take = {key: mark(t.contiguous()) for key, t in take.items()}
        return take, mark(lengths.contiguous()), mark(slots.contiguous())

    def _decode(self, take: dict[str, torch.Tensor], lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.decode_steps(take, lengths, slots)[0]

    def decode_steps(self, take: dict[str, torch.Tensor], lengths: torch.Tensor, slots: torch.Tensor,
                     keep: bool = False) -> tuple[torch.Tensor, Prefix | None]:
        """(user states, and with ``keep`` the :class:`Prefix` a ranking candidate reads: every layer's
        cached keys/values with this request's last event in place)."""
        if self.pool is None:
            raise RuntimeError("decode needs cache_slots > 0")
        m, pool = self.model, self.pool
        B = lengths.shape[0]
        last = (lengths - 1).clamp(min=0).view(B, 1)
        p = (self.G + last).view(B)  # the last event's position in the full sequence
        types = torch.full_like(take["ids"], TOKEN_GROUP_ITEM)
        x = m.embed(take["ids"], take["ratings"], take["gaps"], types, p.view(B, 1))
        tok_valid = take["ids"] != 0
        if m.context is not None:
            x = x + m.context(take["query_times"], take["query_gaps"]) * tok_valid.unsqueeze(-1).to(x.dtype)
        times_c = pool.times.index_select(0, slots)
        ar = torch.arange(self.T, device=slots.device)
        mask = (ar.view(1, -1) <= p.view(-1, 1)) & pool.valid.index_select(0, slots)
        mask[torch.arange(B, device=slots.device), p] = tok_valid[:, 0]
        rows = torch.arange(B, device=slots.device)
        rab = m.layers[0].attn.rab  # every layer has its own tables but the same indices
        pos_index = p.view(-1, 1) - ar.view(1, -1) + rab.max_len - 1  # (B, T)
        buckets = bucketize_time_gaps(take["query_times"] - times_c, rab.num_buckets)  # (B, T)
        keys, values = [], []
        for li, layer in enumerate(m.layers):
            blk = layer.attn
            u, q, k, v = attn_inputs(blk, x)  # q, k: (B, 1, H, dqk)
            if self.paged:  # the last event's K/V into the slot (recomputed by its next step anyway), read in place
                pool.k[li][slots, :, p] = k[:, 0]
                pool.v[li][slots, :, p] = v[:, 0]
                kc, vc = pool.k[li], pool.v[li]
                attn = slot_attention(q, kc, vc, slots, mask.unsqueeze(1), pos_index.unsqueeze(1),
                                      buckets.unsqueeze(1), blk.rab.pos_w, blk.rab.ts_w, blk.max_len)
            else:
                kc, vc = pool.read(li, slots)  # (B, H, T, d)
                kc[rows, :, p] = k[:, 0]
                vc[rows, :, p] = v[:, 0]
                attn = attend_one(blk, q, kc, vc, mask, pos_index, buckets)
            if keep:
                keys.append(kc)
                values.append(vc)
            x = attn_output(blk, x, u, attn)
            h, _ = layer.ffn(layer.norm(x, types), tok_valid, with_loss=False)
            x = x + h
        user = F.normalize(x[:, 0].float(), dim=-1, eps=1e-6)
        if not keep:
            return user, None
        request_time = take["query_times"][:, 0]
        valid_c = pool.valid.index_select(0, slots).clone()
        valid_c[rows, p] = tok_valid[:, 0]
        key_mask, pos_index_c, buckets_c, last_time = prefix_indices(rab.max_len, rab.num_buckets, times_c, valid_c,
                                                                     p + 1, request_time)
        return user, Prefix(keys, values, key_mask, pos_index_c, buckets_c, request_time, last_time,
                            slots if self.paged else None)

    # ---- append ------------------------------------------------------------------------------------

    def append(self, buf: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
        """Each row's events from ``starts`` (recent positions) to its last, against the K/V cached before them
        (:mod:`models.ugt.runner.append`); the slot then holds what a prefill of the row would have written."""
        if self.pool is None:
            raise RuntimeError("append needs cache_slots > 0")
        batch = self.layout.unpack(buf[:, : self.layout.width])
        slots = buf[:, self.layout.width]
        return append_step(self.model, self.pool, self.G, batch, slots, starts, width, self.paged)

    def run_append(self, buf: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
        """:meth:`append` of a device batch, through a graph per (batch, suffix width) on CUDA (eager on CPU,
        also when the other steps are compiled: the suffix width varies)."""
        buf = self.layout.stack_columns(buf, compact=False)
        key = BatchDescriptor("append", buf.shape[0], suffix=width)
        return self.dispatcher.run(key, lambda b, s: self.append(b, s, width), buf, starts)

    # ---- dispatch ----------------------------------------------------------------------------------

    def run(self, kind: str, buf: torch.Tensor) -> torch.Tensor:
        """prefill/decode/decode_compact of a device batch: compiled, through a captured CUDA graph, or eager."""
        if kind not in STEPS:
            raise ValueError(f"unknown step {kind!r}; one of {STEPS}")
        fn = getattr(self, kind)
        buf = self.layout.stack_columns(buf, compact=kind == "decode_compact")
        if kind == "prefill" and self.eager_prefill(buf.shape[0]):
            with torch.profiler.record_function("step:prefill_eager"):
                return fn(buf)
        if self.compiled:  # one memory layout whatever the exclusion width, so the compiled code's guards hold
            return fn(batch_dim_dynamic(buf.contiguous()))
        return self.dispatcher.run(BatchDescriptor(kind, buf.shape[0]), fn, buf)

    def compile(self) -> None:
        """torch.compile prefill and the decode step, and compile them now (a dummy batch of two rows).

        Compiling at start keeps it off the first requests and lets a forked engine process inherit the code.
        Only the batch dimension is dynamic; a batch of one is padded to two (PyTorch specializes size 1), so one
        graph per step serves every batch size.
        """
        check_can_compile(self.layout.device)
        self._prefill = compile_step(self._prefill)  # type: ignore[method-assign]
        if self.pool is not None:
            self._decode = compile_step(self._decode)  # type: ignore[method-assign]
        self.compiled = True
        layout = self.layout
        rows = np.zeros((2, layout.width), dtype=np.int64)
        rows[:, 0] = 1  # item 1 at position 0
        rows[:, 6 * layout.N] = 1  # length 1
        scratch = [layout.scratch_slot] * 2
        no_excl = np.zeros((2, 1), np.int64)
        with torch.inference_mode():
            self.run("prefill", layout.pack(rows, no_excl, scratch, 2))  # CPU only: already on the device
            if self.pool is not None:
                self.run("decode", layout.pack(rows, no_excl, scratch, 2))
                self.run("decode_compact", layout.pack_compact(rows, no_excl, scratch, 2))
