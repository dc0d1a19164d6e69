"""HSTU block steps split apart, so the KV-cache decode and target-aware candidate scoring reuse them.

``HSTUBlock.forward`` does projection -> attention -> gated output in one call over a whole sequence. The
cached paths need the pieces: the keys/values of a prefix computed once, and new queries (the last event,
or ranking candidates) attending to them. Same weights, same arithmetic as the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.hstu import HSTUBlock


def attn_inputs(block: HSTUBlock, x: torch.Tensor):
    """HSTUBlock's projections: u (B, N, H*dv), q/k (B, N, H, dqk), v (B, N, H, dv)."""
    B, N, _ = x.shape
    H = block.num_heads
    normed = F.layer_norm(x, (block.d_model,), eps=block.eps)
    proj = getattr(block, "uvqk_proj", None)  # int8 inference (models/ugt/quantize.py): the same product as a Linear
    projected = proj(normed) if proj is not None else normed @ block.uvqk
    u, v, q, k = torch.split(F.silu(projected), [block.dv * H, block.dv * H, block.dqk * H, block.dqk * H], dim=-1)
    return u, q.view(B, N, H, block.dqk), k.view(B, N, H, block.dqk), v.view(B, N, H, block.dv)


def attn_output(block: HSTUBlock, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The block's gated output projection and residual (dropout as the block applies it in training)."""
    gated = u * F.layer_norm(attn, (block.dv * block.num_heads,), eps=block.eps)
    return x + block.o(F.dropout(gated, p=block.dropout, training=block.training))


def attend_one(block: HSTUBlock, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor,
               pos_index: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """HSTU attention of C queries per row that share one position against head-major keys/values: (B, C, H * dv).

    q (B, C, H, dqk); kc, vc (B, H, T, d); mask, pos_index, buckets (B, T): the query row of
    :func:`models.hstu.hstu_attention`'s masked, biased weights (C = 1: a decode step; C candidates: ranking).
    """
    B, T = mask.shape
    scores = torch.matmul(q.transpose(1, 2), kc.transpose(-1, -2))  # (B, H, C, T)
    bias = (block.rab.pos_w[pos_index] + block.rab.ts_w[buckets]).view(B, 1, 1, T)
    w = F.silu(scores + bias.to(scores.dtype)) / float(block.max_len)
    w = w * mask.view(B, 1, 1, T).to(w.dtype)
    return torch.matmul(w, vc).transpose(1, 2).reshape(B, q.shape[1], -1)  # (B, H, C, dv) -> (B, C, H * dv)
