"""Append: a cached user's new events run through the layers against the K/V already in their slot.

A row that extends its cached one (:class:`.slot_cache.PrefixCache`, kind ``append``) keeps the K/V of every
position before ``start`` (the cached row's committed positions, and the long-term tokens before them) and
computes the suffix from ``start`` to its last event: S tokens per row, each at its own position, attending
causally to the cached keys and to the suffix before it, with the same relative position and time bias as a
prefill. Exact, not an approximation: attention is causal and the rest of a layer per token, so the kept
positions' K/V are what a prefill of the longer row computes there (``tests/models/test_kv_append.py``).

Rows are padded to one suffix width S (a power of two with CUDA graphs, one graph per (batch bucket, S));
suffix tokens past a row's length are padding (:func:`suffix_writes` makes their writes repeat a live token's).
Only the suffix's K/V are written, in place (``index_put`` on the slots): copying each row's whole window per layer
out and back, as this step first did, was about half of an industrial-size engine step's GPU time (1,024
positions, docs/SERVING.md) and ran out of memory at 512 rows a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contracts.tokenizer import TOKEN_GROUP_ITEM
from models.kernels.reference import bucketize_time_gaps
from models.kernels.slot_attention import rows_attention, slot_attention
from models.ugt.model import UGT
from models.ugt.runner.batch import ROW_FIELDS
from models.ugt.runner.slot_cache import SlotPool
from models.ugt.steps import attn_inputs, attn_output


def suffix_width(n: int, padded: bool) -> int:
    """The suffix width of a group whose longest suffix is ``n`` tokens: a power of two when ``padded``."""
    return max(2, 1 << (n - 1).bit_length()) if padded else max(n, 1)


def put(cached: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``cached`` (size T along ``dim``) with ``values`` written at ``index`` along ``dim``; index T is dropped."""
    pad = torch.zeros_like(cached.narrow(dim, 0, 1))
    return torch.cat([cached, pad], dim).scatter(dim, index, values).narrow(dim, 0, cached.shape[dim])


def suffix_tokens(model: UGT, batch: dict[str, torch.Tensor], starts: torch.Tensor, width: int, G: int, T: int):
    """(x (B, S, D), the suffix's ROW_FIELDS (B, S) zeroed past each row's length, positions (B, S) in the full
    sequence, where each token is written (T for padding), its validity)."""
    B, N = batch["ids"].shape
    rpos = starts.view(B, 1) + torch.arange(width, device=starts.device).view(1, width)  # recent positions
    live = rpos < batch["lengths"].view(B, 1)
    at = rpos.clamp(max=N - 1)
    take = {key: batch[key].gather(1, at) * live for key in ROW_FIELDS}
    p = G + at
    dest = torch.where(live, G + rpos, torch.full_like(rpos, T))
    types = torch.full_like(take["ids"], TOKEN_GROUP_ITEM)
    x = model.embed(take["ids"], take["ratings"], take["gaps"], types, p)
    tok_valid = take["ids"] != 0
    if model.context is not None:
        x = x + model.context(take["query_times"], take["query_gaps"]) * tok_valid.unsqueeze(-1).to(x.dtype)
    return x, take, p, dest, tok_valid


def suffix_writes(dest: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each suffix token's K/V goes, with padding made harmless for an in-place scatter: (the suffix index
    each token takes its values from (B, S), its position (B, S), rows with a live token (B,)).

    A row's live tokens come first (``dest`` < T) and padding after (``dest`` = T, one past the window). Padding
    repeats the row's last live token (the same values at the same place: duplicate writes agree); a row with no
    live token writes position T - 1 with what is there already (``keep_or``)."""
    B, S = dest.shape
    n_live = (dest < T).sum(1)
    pick = torch.minimum(torch.arange(S, device=dest.device).view(1, S), (n_live - 1).clamp(min=0).view(B, 1))
    return pick, dest.gather(1, pick).clamp(max=T - 1), n_live > 0


def write_suffix(cache: torch.Tensor, rows: torch.Tensor, at: torch.Tensor, values: torch.Tensor) -> None:
    """In place: ``cache`` (R, H, T, d) gets ``values`` (B, S, H, d) at rows ``rows`` (B,) and positions ``at``
    (B, S) (index_put on the position-major view: no copy of the whole window)."""
    B, S = at.shape
    cache.transpose(1, 2).index_put_((rows.view(B, 1).expand(B, S), at), values)


def keep_or(new: torch.Tensor, pick: torch.Tensor, at: torch.Tensor, live_rows: torch.Tensor,
            window: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, S, H, d) values to write: each token's own (``pick``), or for a row with no live token what
    ``window`` (R, H, T, d) holds at ``at`` already in row ``rows`` (B,) (default: row b of a (B, H, T, d) copy)."""
    B, S, H, d = new.shape
    mine = new.gather(1, pick.view(B, S, 1, 1).expand(B, S, H, d))
    if rows is None:
        rows = torch.arange(B, device=at.device)
    there = window[rows.view(B, 1).expand(B, S), :, at]  # (B, S, H, d)
    return torch.where(live_rows.view(B, 1, 1, 1), mine, there)


def append_step(model: UGT, pool: SlotPool, G: int, batch: dict[str, torch.Tensor], slots: torch.Tensor,
                starts: torch.Tensor, width: int, paged: bool = False) -> torch.Tensor:
    """User states (B, D) fp32; writes the suffix's K/V, times and validity into the slots.

    Per layer only the suffix's positions are written into the pool. ``paged``: the attention reads the pool in
    place (:func:`models.kernels.slot_attention.slot_attention`); else each row's cached window is read once
    (``index_select``) and the suffix written into that copy too.
    """
    B = slots.shape[0]
    T = pool.times.shape[1]
    x, take, p, dest, tok_valid = suffix_tokens(model, batch, starts, width, G, T)
    times = put(pool.times.index_select(0, slots), 1, dest, take["times"])
    valid = put(pool.valid.index_select(0, slots), 1, dest, tok_valid)
    ar = torch.arange(T, device=slots.device).view(1, 1, T)
    mask = (ar <= p.unsqueeze(-1)) & valid.unsqueeze(1)  # (B, S, T): causal, valid keys
    rab = model.layers[0].attn.rab  # every layer has its own tables but the same indices
    pos_index = p.unsqueeze(-1) - ar + rab.max_len - 1
    buckets = bucketize_time_gaps(take["query_times"].unsqueeze(-1) - times.unsqueeze(1), rab.num_buckets)
    types = torch.full_like(take["ids"], TOKEN_GROUP_ITEM)
    pick, at, live_rows = suffix_writes(dest, T)
    rows = torch.arange(B, device=slots.device)
    for li, layer in enumerate(model.layers):
        blk = layer.attn
        u, q, k, v = attn_inputs(blk, x)  # (B, S, H, d)
        if paged:
            write_suffix(pool.k[li], slots, at, keep_or(k, pick, at, live_rows, pool.k[li], slots))
            write_suffix(pool.v[li], slots, at, keep_or(v, pick, at, live_rows, pool.v[li], slots))
            attn = slot_attention(q, pool.k[li], pool.v[li], slots, mask, pos_index, buckets, blk.rab.pos_w,
                                  blk.rab.ts_w, blk.max_len)
        else:
            kc, vc = pool.read(li, slots)  # (B, H, T, d) copies
            k_new, v_new = keep_or(k, pick, at, live_rows, kc), keep_or(v, pick, at, live_rows, vc)
            write_suffix(kc, rows, at, k_new)
            write_suffix(vc, rows, at, v_new)
            write_suffix(pool.k[li], slots, at, k_new)
            write_suffix(pool.v[li], slots, at, v_new)
            attn = rows_attention(q, kc, vc, mask, pos_index, buckets, blk.rab.pos_w, blk.rab.ts_w, blk.max_len)
        x = attn_output(blk, x, u, attn)
        h, _ = layer.ffn(layer.norm(x, types), tok_valid, with_loss=False)
        x = x + h
    pool.times.index_copy_(0, slots, times)
    pool.valid.index_copy_(0, slots, valid)
    last = (batch["lengths"] - 1 - starts).clamp(min=0, max=width - 1)
    return F.normalize(x[torch.arange(B, device=slots.device), last].float(), dim=-1, eps=1e-6)
