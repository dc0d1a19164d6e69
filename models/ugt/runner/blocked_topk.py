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


class BlockMask:
    """The exclusions (B, X) (item indices, 0 = padding) split once by block, so that masking a block costs two
    kernels (a compare-select and a scatter) instead of a handful: at 1M items there are tens of blocks, and the
    eager GPU path pays a launch per kernel.

    Exclusions outside a block are aimed at their index within their own block (clamped into the last, shorter
    block) with +inf under an ``amin`` scatter, which leaves that column as it was: no data-dependent shapes, and
    several exclusions on one column give the same result whatever order the scatter runs in. (CUDA's
    ``scatter_reduce`` is flagged nondeterministic: under ``torch.use_deterministic_algorithms(True)``, which the
    engine does not set, it raises.)
    """

    def __init__(self, excl: torch.Tensor, block: int, dtype: torch.dtype):
        self.block = block
        self.block_of = torch.div(excl, block, rounding_mode="floor")
        self.local = excl - self.block_of * block
        # 0-d tensors filled on the device (a host copy is not allowed while a CUDA graph captures)
        self.masked = torch.full((), float("-inf"), dtype=dtype, device=excl.device)
        self.kept = torch.full((), float("inf"), dtype=dtype, device=excl.device)

    def apply(self, scores: torch.Tensor, index: int) -> None:
        """Set to -inf, in place, the columns of ``scores`` (B, W), block ``index``, that a row excludes."""
        width = scores.shape[1]
        local = self.local if width == self.block else self.local.clamp(max=width - 1)
        fill = torch.where(self.block_of == index, self.masked, self.kept)
        scores.scatter_reduce_(1, local, fill, reduce="amin")


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
    mask = BlockMask(excl, block, table.dtype)
    values, indices = [], []
    for index, (start, stop) in enumerate(block_bounds(num_items, block)):
        scores = u @ table[start:stop].T  # (B, stop - start)
        mask.apply(scores, index)
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
