"""Retrieval: exact dot-product scores of user states against the item table, history and exclusions masked."""

from __future__ import annotations

import torch

from models.ugt.runner.blocked_topk import blocked_topk


def retrieve(user: torch.Tensor, excl: torch.Tensor, table: torch.Tensor, num_items: int,
             k: int, block: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (scores fp32, indices) over items 1..num_items with padding and exclusions (B, X) masked, + the
    number of valid items per row (what a row can be answered with at most).

    ``block`` > 0 and smaller than the catalog: the same answer ``block`` items at a time
    (:mod:`.blocked_topk`), so memory is bounded by a block instead of the (B, V + 1) score matrix.
    """
    counts = num_items - (excl > 0).sum(1)
    if 0 < block <= num_items:
        values, indices = blocked_topk(user, excl, table, num_items, k, block)
        return values.float(), indices, counts
    scores = user.to(table.dtype) @ table[: num_items + 1].T  # (B, V + 1), model dtype (bf16 on GPU)
    scores.scatter_(1, excl, float("-inf"))  # exclusions are unique per row; index 0 pads them
    scores[:, 0] = float("-inf")
    top = scores.topk(min(k, num_items), dim=1)
    return top.values.float(), top.indices, counts


def score_candidates(user: torch.Tensor, candidates: torch.Tensor, table: torch.Tensor,
                     micro_batch: int) -> torch.Tensor:
    """Scores (B, C) fp32 of given candidate items against the users' states, ``micro_batch`` candidates at a
    time (M-FALCON style: the peak memory is bounded whatever C)."""
    if micro_batch <= 0:
        raise ValueError(f"micro_batch must be > 0, got {micro_batch}")
    out = torch.empty(candidates.shape, device=user.device, dtype=torch.float32)
    u = user.to(table.dtype).unsqueeze(1)
    for start in range(0, candidates.shape[1], micro_batch):
        chunk = candidates[:, start : start + micro_batch]
        out[:, start : start + micro_batch] = (table[chunk] * u).sum(-1).float()
    return out
