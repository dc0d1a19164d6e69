"""Target-aware ranking (HSTU's ranking setting, MTGR, M-FALCON): each candidate attends to the history.

Retrieval scores every item against one user state that was computed before any candidate was known. A
ranker does better when each candidate looks at the history itself: the candidate is appended as one more
token (the item with no rating yet, at the request time), attends to every history token and to itself,
never to the other candidates (M-FALCON's mask, so any number of candidates can share one pass), and its
output goes through a small head to a logit.

Attention is causal, so the history's keys and values are the same for every candidate. Training reuses the
sequence forward's layer inputs (:func:`prefix_from_layers`); serving reads them from the KV cache
(``UGTInference``) and scores candidates in micro-batches. Both go through :func:`candidate_logits`.

Training (:func:`ranking_loss`): one cut per row at a random prefix length p; the candidates are the
model's own retrieval top list at p (history masked), as when serving; softmax cross-entropy towards the
true next item where retrieval found it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from contracts.tokenizer import TOKEN_GROUP_ITEM
from models.data import _GAP_THRESHOLDS
from models.hstu import bucketize_time_gaps
from models.kernels.slot_attention import slot_attention
from models.ugt.steps import attend_one, attn_inputs, attn_output

_GAP_BOUNDS: dict[torch.device, torch.Tensor] = {}  # per device: no host-to-device copy inside a CUDA graph


def gap_bucket(gaps: torch.Tensor) -> torch.Tensor:
    """``models.data.time_gap_bucket_array`` in torch (same thresholds): the candidate's gap token."""
    bounds = _GAP_BOUNDS.get(gaps.device)
    if bounds is None:
        bounds = _GAP_BOUNDS[gaps.device] = torch.as_tensor(_GAP_THRESHOLDS, device=gaps.device)
    buckets = 1 + torch.bucketize(gaps, bounds, right=True)
    return torch.where(gaps > 0, buckets, torch.zeros_like(buckets))


class TargetAwareHead(nn.Module):
    """The candidate's position vector (it sits after the history) and its logit.

    logit = MLP(candidate output) + scale * retrieval score. The retrieval term (the user state's cosine with
    the item, which the next-item loss trains) makes the ranker a correction of retrieval, not a second model
    learning the catalog from scratch: at the start it orders candidates as retrieval does, and the
    target-aware MLP learns what one user vector cannot express.
    """

    def __init__(self, d_model: int, retrieval_scale: float = 20.0):
        super().__init__()
        self.position = nn.Parameter(torch.empty(d_model).normal_(mean=0, std=0.02))
        self.norm = nn.LayerNorm(d_model)
        self.hidden = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, 1)
        self.retrieval_scale = nn.Parameter(torch.tensor(float(retrieval_scale)))

    def forward(self, h: torch.Tensor, retrieval: torch.Tensor) -> torch.Tensor:
        """h (B, C, D) candidate outputs, retrieval (B, C) cosine scores -> (B, C) logits."""
        mlp = self.out(F.silu(self.hidden(self.norm(h)))).squeeze(-1)
        return mlp.float() + self.retrieval_scale.float() * retrieval.float()


@dataclass
class Prefix:
    """What candidates read of a history: per-layer keys/values (B, H, T, d) and the bias indices (B, T)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor  # (B, T) bool: the prefix's valid positions
    pos_index: torch.Tensor  # (B, T) index into each layer's relative-position table
    buckets: torch.Tensor  # (B, T) time bucket of request time - event time
    request_time: torch.Tensor  # (B,)
    last_time: torch.Tensor  # (B,) time of the prefix's last event
    # set: keys/values are the KV pool's layers (R, H, T, d) and row b reads slot slots[b] in place
    # (models/kernels/slot_attention.py); None: they are the rows' own (B, H, T, d)
    slots: torch.Tensor | None = None


def prefix_indices(max_len: int, num_buckets: int, times: torch.Tensor, valid: torch.Tensor, end: torch.Tensor,
                   request_time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_mask, pos_index, buckets, last_time) for candidates placed at sequence index ``end`` (B,).

    Keys are positions < end. A full window puts the candidate one past the last trained relative
    position, so the distance is clamped to the table (max_len - 1).
    """
    B, T = valid.shape
    ar = torch.arange(T, device=valid.device).view(1, T)
    at = end.view(B, 1)
    key_mask = (ar < at) & valid
    pos_index = (at - ar).clamp(max=max_len - 1) + max_len - 1
    buckets = bucketize_time_gaps(request_time.view(B, 1) - times, num_buckets)
    last_time = times.gather(1, (at - 1).clamp(min=0)).view(B)
    return key_mask, pos_index, buckets, last_time


def prefix_from_layers(model, layer_inputs: list[torch.Tensor], times: torch.Tensor, valid: torch.Tensor,
                       end: torch.Tensor, request_time: torch.Tensor) -> Prefix:
    """The :class:`Prefix` of a full forward (training, evaluation): keys/values from each layer's input."""
    keys, values = [], []
    for layer, x in zip(model.layers, layer_inputs, strict=True):
        _, _, k, v = attn_inputs(layer.attn, x)
        keys.append(k.transpose(1, 2))
        values.append(v.transpose(1, 2))
    rab = model.layers[0].attn.rab
    key_mask, pos_index, buckets, last_time = prefix_indices(rab.max_len, rab.num_buckets, times, valid, end,
                                                             request_time)
    return Prefix(keys, values, key_mask, pos_index, buckets, request_time, last_time)


def candidate_tokens(model, cands: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """(B, C, D) input tokens of the candidates: item, no rating, gap since the last event, request context."""
    B, C = cands.shape
    zeros = torch.zeros_like(cands)
    gaps = gap_bucket(prefix.request_time - prefix.last_time).view(B, 1).expand(B, C)
    types = torch.full_like(cands, TOKEN_GROUP_ITEM)
    x = model.embed(cands, zeros, gaps, types, None, position_vector=model.ranker.position)
    if model.context is not None:
        when = prefix.request_time.view(B, 1).expand(B, C)
        x = x + model.context(when, zeros) * (cands != 0).unsqueeze(-1).to(x.dtype)
    return x


def candidate_layer(layer, xc: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: Prefix,
                    cand_valid: torch.Tensor) -> torch.Tensor:
    """One UGT layer for candidate tokens: attend to the prefix's keys and to themselves, then GLN + MoE FFN."""
    blk = layer.attn
    B, C, _ = xc.shape
    u, q, k, v = attn_inputs(blk, xc)  # (B, C, H, d)
    if prefix.slots is None:  # the history
        attn = attend_one(blk, q, keys, values, prefix.key_mask, prefix.pos_index, prefix.buckets)
    else:  # read in the pool: one (B, 1, T) row of indices per user, expanded over the candidates
        shape = (B, C, prefix.key_mask.shape[1])
        attn = slot_attention(q, keys, values, prefix.slots, prefix.key_mask.unsqueeze(1).expand(shape),
                              prefix.pos_index.unsqueeze(1).expand(shape), prefix.buckets.unsqueeze(1).expand(shape),
                              blk.rab.pos_w, blk.rab.ts_w, blk.max_len)
    own = (q * k).sum(-1) + (blk.rab.pos_w[blk.rab.max_len - 1] + blk.rab.ts_w[0]).to(q.dtype)  # distance 0, gap 0
    w_own = F.silu(own) / float(blk.max_len) * cand_valid.unsqueeze(-1).to(q.dtype)  # (B, C, H)
    x = attn_output(blk, xc, u, attn + (w_own.unsqueeze(-1) * v).reshape(B, C, -1))
    types = torch.full(cand_valid.shape, TOKEN_GROUP_ITEM, device=xc.device, dtype=torch.long)
    h, _ = layer.ffn(layer.norm(x, types), cand_valid, with_loss=False)
    return x + F.dropout(h, p=layer.dropout, training=layer.training)


def candidate_logits(model, prefix: Prefix, cands: torch.Tensor, user: torch.Tensor, table: torch.Tensor,
                     micro_batch: int = 0, head_only: bool = False) -> torch.Tensor:
    """(B, C) target-aware logits of ``cands`` (item indices, 0 = padding) after ``prefix``.

    ``user`` (B, D) is the L2-normalised state at the prefix's last event and ``table`` the normalised item
    output table (:meth:`UGT.item_embeddings`): the retrieval term of :class:`TargetAwareHead`. Candidates
    never see each other, so micro-batches of ``micro_batch`` change nothing but the peak memory.
    """
    if model.ranker is None:
        raise RuntimeError("this UGT has no ranking head (heads.ranking is off)")
    step = micro_batch if micro_batch > 0 else cands.shape[1]
    out = []
    for start in range(0, cands.shape[1], step):
        chunk = cands[:, start : start + step]
        valid = chunk != 0
        x = candidate_tokens(model, chunk, prefix)
        for layer, keys, values in zip(model.layers, prefix.keys, prefix.values, strict=True):
            x = candidate_layer(layer, x, keys, values, prefix, valid)
        retrieval = (table[chunk] * user.unsqueeze(1).to(table.dtype)).sum(-1)
        out.append(model.ranker(x.detach() if head_only else x, retrieval))
    return torch.cat(out, dim=1)


def ranking_loss(model, user: torch.Tensor, layer_inputs: list[torch.Tensor], times: torch.Tensor,
                 valid: torch.Tensor, batch: dict[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the true next item among retrieval's top list, one random cut per row.

    The candidates are what the ranker sees when serving: the model's own retrieval top
    ``ranking_candidates`` at the cut, history masked. Rows whose true item is not in that list give no
    ranking signal (no reordering can fix them); training on them with the true item forced in would teach
    the head that retrieval's top items are negatives, the opposite of what holds when serving.
    """
    cfg = model.config.heads
    ids, targets, lengths = batch["ids"], batch["targets"], batch["lengths"]
    B, N = ids.shape
    G = valid.shape[1] - N
    n = lengths.clamp(min=1)
    cut = torch.minimum(1 + (torch.rand(B, device=ids.device) * n).long(), n)  # prefix length, 1..n
    at = (cut - 1).view(B, 1)
    true = targets.gather(1, at)  # (B, 1)
    state = user.gather(1, at.unsqueeze(-1).expand(B, 1, user.shape[-1]))[:, 0]  # (B, D), L2-normalised
    with torch.no_grad():
        scores = state.float() @ table.float().T
        scores[:, 0] = float("-inf")
        seen = ids.masked_fill(torch.arange(N, device=ids.device).view(1, N) >= cut.view(B, 1), 0)
        scores.scatter_(1, seen, float("-inf"))  # the history before the cut, as serving masks it
        cands = scores.topk(min(cfg.ranking_candidates, table.shape[0] - 1), dim=1).indices
        hit = cands == true
        rows = hit.any(1) & (true[:, 0] > 0)
    if not bool(rows.any()):
        return user.new_zeros((), dtype=torch.float32)
    request_time = batch["query_times"].gather(1, at).view(B)
    prefix = prefix_from_layers(model, layer_inputs, times, valid, G + cut, request_time)
    # The retrieval term is an input here: the next-item loss trains it, over the whole catalog.
    logits = candidate_logits(model, prefix, cands, state.detach(), table.detach(),
                              head_only=not cfg.ranking_backbone_grad)
    return F.cross_entropy(logits[rows], hit[rows].float().argmax(1))
