"""Exact top-k retrieval over a large catalog, one block of items at a time.

The plain path (:func:`models.ugt.runner.retrieval.retrieve`) scores every user against every item at once: at
1M items and a batch of 512 that is a (512, 1M) score matrix (1 GB in bf16) and a top-k over a million columns.
Here the items are split into blocks of ``block`` columns; per block one matmul, the row's exclusions masked
inside the block, and a top-k of that block; then one top-k over the (B, n_blocks * k) candidates. The answer is
the same: an item in the global top k is in its block's top k. Memory is bounded by one block's scores, and a
block small enough to stay in cache is read by its top-k from there.

Capture-safe (CUDA graphs): the number of blocks and their widths follow from ``num_items`` and ``block`` alone
(Python ints, fixed per catalog version), exclusions are masked with a scatter, and nothing reads back to the host.

Ties: which of several equal scores makes the cut is unspecified (``torch.topk``'s rule), in both paths; rows with
fewer than k valid items end in -inf scores whose indices are placeholders (the valid count says how many to use).
"""

from __future__ import annotations

import torch


def mask_block(scores: torch.Tensor, excl: torch.Tensor, start: int) -> None:
    """Set to -inf, in place, the columns of ``scores`` (B, W), the items start..start+W-1, that a row excludes.

    ``excl`` (B, X) holds item indices (0 = padding). Exclusions outside the block are aimed at a clamped column
    with +inf under an ``amin`` scatter, which leaves it as it was: no data-dependent shapes, and duplicates of a
    clamped column are harmless whatever order the scatter runs in.
    """
    width = scores.shape[1]
    local = excl - start
    inside = (local >= 0) & (local < width)
    # filled on the device, not copied from the host (a host copy is not allowed while a CUDA graph captures)
    fill = torch.full(excl.shape, float("inf"), dtype=scores.dtype, device=scores.device)
    fill.masked_fill_(inside, float("-inf"))
    scores.scatter_reduce_(1, local.clamp(0, width - 1), fill, reduce="amin")


def block_bounds(num_items: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) of every block over the columns 0..num_items (column 0 is the padding item)."""
    if block <= 0:
        raise ValueError(f"block must be > 0, got {block}")
    columns = num_items + 1
    return [(start, min(start + block, columns)) for start in range(0, columns, block)]


def blocked_topk(user: torch.Tensor, excl: torch.Tensor, table: torch.Tensor, num_items: int, k: int,
                 block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores in the table's dtype, indices) over items 1..num_items, exclusions (B, X) and padding masked,
    ``block`` items scored at a time. Rows of ``table`` past ``num_items`` (spare capacity) are never read."""
    u = user.to(table.dtype)
    want = min(k, num_items)
    values, indices = [], []
    for start, stop in block_bounds(num_items, block):
        scores = u @ table[start:stop].T  # (B, stop - start)
        mask_block(scores, excl, start)
        if start == 0:
            scores[:, 0] = float("-inf")
        top = scores.topk(min(want, stop - start), dim=1)
        values.append(top.values)
        indices.append(top.indices + start)
    if len(values) == 1:
        return values[0], indices[0]
    cand_values, cand_indices = torch.cat(values, 1), torch.cat(indices, 1)
    top = cand_values.topk(want, dim=1)
    return top.values, cand_indices.gather(1, top.indices)
