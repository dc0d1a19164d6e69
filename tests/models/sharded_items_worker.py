"""Run under `torchrun --nproc-per-node N` by tests/models/test_sharded_items.py: the sharded item table's loss and
gradients against the unsharded ones, on the same global batch.

Every rank builds every rank's inputs (seeded by rank), so each can compute the one-process reference: the item
table as a plain ``nn.Embedding`` and the full softmax of :func:`models.losses.sampled_softmax_loss` over the whole
batch. The sharded side: rank r embeds its own histories through :class:`ShardedEmbedding`, makes user states with
a replicated linear layer, and scores them with :func:`sharded_softmax_loss`; the linear layer's gradients are
averaged over ranks (as DDP does), the table's stay with their owners. Writes the largest differences as JSON.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.losses import sampled_softmax_loss
from models.sharded_items import ShardedEmbedding, sharded_softmax_loss

ITEMS, DIM, HISTORY, TEMPERATURE = 37, 8, 5, 0.1  # 38 rows: not a multiple of 4 ranks, so the last shard is short


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s histories (B, HISTORY) and targets (B,); ranks have different row counts, some targets 0."""
    g = torch.Generator().manual_seed(100 + rank)
    rows = 3 + rank
    ids = torch.randint(0, ITEMS + 1, (rows, HISTORY), generator=g)
    targets = torch.randint(1, ITEMS + 1, (rows,), generator=g)
    targets[0] = 0  # a position without a target
    return ids, targets


def users(table: torch.nn.Module, linear: torch.nn.Linear, ids: torch.Tensor) -> torch.Tensor:
    return F.normalize(linear(table(ids).mean(1)), dim=-1)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    whole = torch.nn.Embedding(ITEMS + 1, DIM, padding_idx=0)
    torch.nn.init.normal_(whole.weight)  # row 0 too, as UnifiedEmbedding's init leaves it: looked up, never trained
    linear = torch.nn.Linear(DIM, DIM)
    batches = [rank_batch(r) for r in range(world)]
    # reference: one process, the whole batch; the loss is the mean over every rank's targets
    ids = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    ref_loss = sampled_softmax_loss(users(whole, linear, ids), targets, F.normalize(whole.weight, dim=-1), 0,
                                    TEMPERATURE)
    ref_loss.backward()
    ref_table, ref_linear = whole.weight.grad.clone(), linear.weight.grad.clone()
    linear.zero_grad()
    # sharded: this rank's rows only, loss weighted by its share of the targets (models/distributed.step_batches)
    shard = ShardedEmbedding(whole.weight.detach(), rank, world)
    my_ids, my_targets = batches[rank]
    total = int(sum((b[1] > 0).sum() for b in batches))
    weight = int((my_targets > 0).sum()) * world / total
    ids_global = shard.local_ids()
    table = F.normalize(shard.weight, dim=-1)
    loss = sharded_softmax_loss(users(shard, linear, my_ids), my_targets, table, ids_global, shard.group, TEMPERATURE)
    (loss * weight).backward()
    dist.all_reduce(linear.weight.grad)
    linear.weight.grad /= world  # DDP's average
    loss_sum = torch.tensor([float(loss.detach()) * weight / world])
    dist.all_reduce(loss_sum)
    full_grad = shard.gather_full(shard.weight.grad)
    full_weight = shard.gather_full()
    if rank == 0:
        print(json.dumps({
            "world": world, "block": shard.group.block,
            "loss": abs(float(loss_sum) - float(ref_loss)),
            "table_grad": float((full_grad - ref_table).abs().max()),
            "table_grad_scale": float(ref_table.abs().max()),
            "linear_grad": float((linear.weight.grad - ref_linear).abs().max()),
            "linear_grad_scale": float(ref_linear.abs().max()),
            "gathered_weight": float((full_weight - whole.weight.detach()).abs().max()),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
