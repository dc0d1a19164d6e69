"""Merging the retrieval and beam-search lists by reciprocal rank fusion (Cormack et al.)."""

from __future__ import annotations

import torch

RRF_K = 60.0  # reciprocal-rank fusion constant (Cormack et al.)


def rrf_merge(ret_idx: torch.Tensor, gen_idx: torch.Tensor, gen_logp: torch.Tensor, num_items: int,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of sum(1 / (RRF_K + rank)) over both lists: (fused scores, items); -inf where fewer than k.

    ``ret_idx`` (B, R) and ``gen_idx`` (B, G) are best first; a generated item whose log-prob is -inf (banned)
    adds nothing. Item 0 (padding) is never returned.
    """
    B, device = ret_idx.shape[0], ret_idx.device
    ranks = torch.arange(1, ret_idx.shape[1] + 1, device=device, dtype=torch.float32)
    fused = torch.zeros(B, num_items + 1, device=device)
    fused.scatter_add_(1, ret_idx, (1.0 / (RRF_K + ranks)).expand(B, -1).contiguous())
    granks = torch.arange(1, gen_idx.shape[1] + 1, device=device, dtype=torch.float32).expand(B, -1)
    contrib = torch.where(torch.isfinite(gen_logp), 1.0 / (RRF_K + granks), torch.zeros_like(granks))
    fused.scatter_add_(1, gen_idx, contrib)
    fused[:, 0] = 0
    top = fused.topk(min(k, num_items), dim=1)
    values = top.values.masked_fill(top.values <= 0, float("-inf"))
    return values, top.indices
