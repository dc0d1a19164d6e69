"""A row-wise sharded item table for `ugt train` under torchrun (``shard_items: true``): 1M+ item catalogs.

Why: with DDP every rank holds the whole item table, its gradient and its two AdamW moments (4 copies of
V x D floats), and the full-softmax loss makes a (rows x V) logits matrix. Here rank q owns the contiguous rows
``[q * block, (q + 1) * block)`` of the ID table (``block = ceil((V + 1) / world)``), for both uses of it:

- **input lookup** (:class:`ShardedEmbedding`, in place of ``nn.Embedding``): every rank's ids are all-gathered,
  each owner looks up the rows it holds (zeros for the others), and one all-to-all hands every rank the sum, which
  is its rows; backward all-gathers the rows' gradients and each owner adds those of its own rows.
- **output table and full softmax** (:func:`sharded_softmax_loss`): the ranks' user states (and targets) are
  all-gathered; each rank scores them against its own rows of the output table only, and the softmax
  normaliser is a distributed logsumexp (all-reduce of the row max, then of the sum of exps), the target's logit
  coming from its owner (an all-reduce of the owner's value). Backward: (softmax - one-hot) on the local columns
  gives the shard's gradient; the user states' gradient is a reduce-scatter of the ranks' partial sums.

No rank holds the whole table or a whole logits row while training: per rank, the shard, its gradient and its
AdamW state (4 x block x D floats) and the loss's (all ranks' rows x block) logits. Rank 0 gathers the whole table
after each epoch to evaluate and save (checkpoints hold whole tensors, so any world size, sharded or not, resumes).

Gradient scale: DDP averages the replicated parameters' gradients over ranks; the shard is not DDP's (it is
ignored there) and receives every rank's contribution through the collectives, so a hook divides it by the world
size: the two together are the gradient of the global batch's mean loss, as in one process.

Built on torch.distributed directly (gloo and NCCL both have all_gather, all_to_all and reduce_scatter), not
TorchRec: TorchRec shards lookups, not an output layer under a full softmax; its tables train with fbgemm's fused
optimizers outside AdamW and the checkpoints' format; and it needs fbgemm-gpu, which is not in the lock
(docs/TRAINING.md).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

TABLE_KEY = "embed.item_emb.weight"  # the sharded table's name in a UGT state dict
LAST_LOSS_BYTES = {"peak": 0}  # the last sharded loss's peak activation bytes on this rank (bench/sharded_items.py)


class ShardGroup:
    """Where this rank's rows are: ``world`` ranks each owning ``block`` rows of a table of ``rows`` rows."""

    def __init__(self, rows: int, rank: int, world: int):
        self.rows, self.rank, self.world = rows, rank, world
        self.pg: Any = None  # the process group of the table's collectives (None: the default one)
        self.block = math.ceil(rows / world)
        self.offset = rank * self.block

    def owned(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(whether this rank owns each global id, its local row index, clamped into the shard)."""
        local = ids - self.offset
        mine = (local >= 0) & (local < self.block)
        return mine, local.clamp(0, self.block - 1)

    def shard_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's ``block`` rows of a whole (rows, ...) tensor, zero-padded past the end."""
        part = full[self.offset : self.offset + self.block]
        if part.shape[0] < self.block:
            part = torch.cat([part, part.new_zeros(self.block - part.shape[0], *part.shape[1:])])
        return part.clone()


def _gather_padded(x: torch.Tensor, group: ShardGroup) -> tuple[torch.Tensor, list[int]]:
    """All ranks' ``x`` (n_r, ...) stacked as (world, n_max, ...), zero-padded, and every rank's n_r."""
    world = group.world
    sizes = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group.pg)
    counts = [int(s.item()) for s in all_sizes]
    n_max = max(max(counts), 1)
    padded = torch.cat([x, x.new_zeros(n_max - x.shape[0], *x.shape[1:])])
    out = x.new_empty(world * n_max, *x.shape[1:])
    dist.all_gather_into_tensor(out, padded.contiguous(), group=group.pg)
    return out.view(world, n_max, *x.shape[1:]), counts


class _Lookup(torch.autograd.Function):
    """Rows of a sharded table for this rank's ids: all-gather ids, owners look up, all-to-all back."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, group: ShardGroup) -> torch.Tensor:
        all_ids, _ = _gather_padded(ids, group)  # (W, n_max)
        mine, local = group.owned(all_ids)
        rows = weight[local] * mine.unsqueeze(-1).to(weight.dtype)  # (W, n_max, D): my rows of everyone's ids
        received = torch.empty_like(rows)
        dist.all_to_all_single(received, rows.contiguous(), group=group.pg)  # piece q: owner q's rows of my ids
        ctx.save_for_backward(local, mine & (all_ids > 0))  # row 0 is padding: no gradient (padding_idx)
        ctx.group, ctx.n, ctx.shape = group, ids.shape[0], weight.shape
        return received.sum(0)[: ids.shape[0]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        local, mine = ctx.saved_tensors
        all_grad, _ = _gather_padded(grad.contiguous(), ctx.group)  # (W, n_max, D)
        weight_grad = grad.new_zeros(ctx.shape)
        weight_grad.index_add_(0, local[mine], all_grad[mine])
        return None, weight_grad, None


class ShardedEmbedding(nn.Module):
    """``nn.Embedding`` over a table whose rows are spread over the ranks: ``weight`` is this rank's block only.

    ``num_embeddings`` is the whole table's row count, so code that sizes things by it is unchanged."""

    sharded = True

    def __init__(self, full_weight: torch.Tensor, rank: int, world: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = full_weight.shape
        self.group = ShardGroup(self.num_embeddings, rank, world)
        # its own communicator: the table's collectives run inside forward and backward, and on a group of their
        # own they never interleave with DDP's gradient all-reduces (whose order a rank's unused parameters change)
        self.group.pg = dist.new_group() if dist.is_initialized() and world > 1 else None
        self.weight = nn.Parameter(self.group.shard_of(full_weight.detach()))
        self.weight.register_hook(lambda g: g / world)  # DDP averages the others; this one gets every rank's sum

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return _Lookup.apply(flat, self.weight, self.group).view(*ids.shape, self.embedding_dim)

    def local_ids(self) -> torch.Tensor:
        """The global ids of this rank's rows; the last rank's may run past the table (padding, masked out)."""
        return torch.arange(self.group.offset, self.group.offset + self.group.block, device=self.weight.device)

    def gather_full(self, tensor: torch.Tensor | None = None) -> torch.Tensor | None:
        """The whole (rows, D) table (or a per-row tensor shaped like the shard, e.g. an AdamW moment) on rank 0;
        None on the others. Every rank calls it."""
        part = (self.weight if tensor is None else tensor).detach().contiguous()
        out = part.new_empty(self.group.world * self.group.block, *part.shape[1:])
        dist.all_gather_into_tensor(out, part, group=self.group.pg)
        return out[: self.num_embeddings].clone() if self.group.rank == 0 else None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-row full-softmax cross-entropy over a vocabulary split by rows across ranks (Megatron's vocab-parallel
    cross-entropy, with the rows all-gathered first because each rank brings its own batch)."""

    @staticmethod
    def forward(ctx: Any, user: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                group: ShardGroup, temperature: float) -> torch.Tensor:
        world = group.world
        all_user, _ = _gather_padded(user, group)  # (W, m_max, D)
        all_tgt, _ = _gather_padded(targets, group)
        m_max = all_user.shape[1]
        all_user, all_tgt = all_user.reshape(world * m_max, -1), all_tgt.reshape(-1)
        logits = (all_user @ table.T) / temperature  # (W * m_max, block)
        logits = logits.masked_fill(~valid, float("-inf"))
        row_max = logits.max(1).values.clamp(min=-1e30)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group.pg)
        exp = (logits - row_max.unsqueeze(1)).exp_()
        del logits
        sum_exp = exp.sum(1)
        dist.all_reduce(sum_exp, group=group.pg)
        mine, local = group.owned(all_tgt)
        mine = mine & (all_tgt > 0)  # padded rows (target 0) have no target
        target_logit = (all_user * table[local]).sum(-1) / temperature * mine.to(user.dtype)
        dist.all_reduce(target_logit, group=group.pg)
        loss = sum_exp.log() + row_max - target_logit
        exp /= sum_exp.unsqueeze(1)  # now the softmax over the whole vocabulary, this rank's columns
        ctx.save_for_backward(all_user, table, exp, local, mine)
        ctx.group, ctx.temperature, ctx.m_max, ctx.n = group, temperature, m_max, user.shape[0]
        LAST_LOSS_BYTES["peak"] = sum(t.numel() * t.element_size() for t in (exp, exp, all_user, table))
        start = group.rank * m_max
        return loss[start : start + user.shape[0]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None, None]:
        all_user, table, softmax, local, mine = ctx.saved_tensors
        all_grad, _ = _gather_padded(grad.contiguous(), ctx.group)
        g = all_grad.reshape(-1) / ctx.temperature
        grad_logits = softmax * g.unsqueeze(1)
        rows = torch.nonzero(mine).squeeze(1)
        grad_logits[rows, local[rows]] -= g[rows]
        grad_table = grad_logits.T @ all_user
        partial = grad_logits @ table  # (W * m_max, D): this shard's share of every row's gradient
        grad_user = partial.new_empty(ctx.m_max, partial.shape[1])
        dist.reduce_scatter_tensor(grad_user, partial.contiguous(), group=ctx.group.pg)
        return grad_user[: ctx.n], grad_table, None, None, None, None


def sharded_softmax_loss(user: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, table_ids: torch.Tensor,
                         group: ShardGroup, temperature: float) -> torch.Tensor:
    """Mean full-softmax loss over this rank's positions with ``targets > 0``, the vocabulary being every rank's
    ``table`` (block, D) rows (global ids ``table_ids``; 0 and past the catalog are not items).

    Every rank must call it at each step, with or without targets (the collectives pair up)."""
    mask = targets > 0
    u = user[mask].float()
    valid = ((table_ids > 0) & (table_ids < group.rows)).unsqueeze(0)
    loss = _ShardedCrossEntropy.apply(u, table.float(), targets[mask], valid, group, temperature)
    return loss.mean() if loss.numel() else loss.sum()


def activation_bytes(rows: int, block: int, dim: int, bytes_per: int = 4) -> int:
    """Peak bytes the sharded loss keeps per rank: the softmax over its columns (and the logits it came from, alive
    together once), the gathered user states and the shard's output vectors; what :class:`_ShardedCrossEntropy`
    records in ``LAST_LOSS_BYTES``."""
    return (2 * rows * block + rows * dim + block * dim) * bytes_per


def shard_output(embed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a :class:`models.ugt.embedding.UnifiedEmbedding`'s output table (block, D), from its own
    ID rows plus the replicated metadata / semantic-ID parts, and their global ids (padding past the end)."""
    shard = embed.item_emb
    ids = shard.local_ids()
    return embed.output_vectors(ids.clamp(max=shard.num_embeddings - 1), id_rows=shard.weight), ids


def check_shardable(model: Any, cfg: Any, excluded: Any, teacher: Any) -> None:
    """What ``shard_items`` cannot train with, as a clear error before any step."""
    embed = getattr(model, "embed", None)
    problems = []
    if embed is None or "id" not in embed.config.item_repr.split("+"):
        problems.append("a UGT whose items have ID rows (model: ugt, item_repr id or id+sid)")
    if cfg.num_negatives != 0:
        problems.append("the full softmax (num_negatives: 0)")
    if cfg.distributed != "ddp":
        problems.append("distributed: ddp")
    if getattr(model, "freshness", None) is not None or getattr(model, "ranker", None) is not None:
        problems.append("no freshness term and no ranking head (they score whole logits rows)")
    if teacher is not None or excluded is not None:
        problems.append("no distill and no cold_items holdout")
    if problems:
        raise ValueError("shard_items needs " + "; ".join(problems))


class ItemShards:
    """The training run's side of a sharded item table: swaps the model's ID table for this rank's shard, gathers
    it on rank 0 to evaluate and save (the whole table lives in host memory there between evaluations), and maps
    the table's AdamW moments between the whole tensors a checkpoint holds and the shard.

    Inactive (every method a no-op) unless ``shard_items`` is on and the world has more than one rank: a world of
    one trains the unsharded model, exactly."""

    def __init__(self, model: Any, env: Any, cfg: Any, excluded: Any = None, teacher: Any = None,
                 best_state: dict | None = None):
        self.active = bool(getattr(cfg, "shard_items", False)) and env.active
        self.main = env.main
        if not self.active:
            return
        check_shardable(model, cfg, excluded, teacher)
        self.embed = model.embed
        whole = self.embed.item_emb
        self.shard = ShardedEmbedding(whole.weight.data, env.rank, env.world_size).to(whole.weight.device)
        self.shard.weight.sharded_rows = True  # models.distributed.wrap keeps it out of DDP
        self.whole = whole.cpu() if env.main else None
        self.embed.item_emb = self.shard
        if best_state and TABLE_KEY in best_state:  # rank 0's best weights keep their table in host memory too
            best_state[TABLE_KEY] = best_state[TABLE_KEY].cpu()

    def host_copy(self, state: dict) -> dict:
        """A copy of a (whole) state dict to keep as the best weights; the item table's copy in host memory."""
        return {k: (v.detach().cpu().clone() if self.active and k == TABLE_KEY else copy.deepcopy(v))
                for k, v in state.items()}

    def sync(self) -> None:
        """Rank 0's whole copy from the shards (every rank calls it)."""
        if self.active:
            full = self.shard.gather_full()
            if self.main:
                self.whole.weight.data.copy_(full.cpu())

    def whole_model(self, device: torch.device) -> Any:
        """Inside, rank 0's model has its whole item table (evaluation, checkpoints)."""
        return _WholeItems(self if self.active and self.main else None, device)

    def finish(self, device: torch.device) -> None:
        """Rank 0 after training: the model keeps its whole table from here on (test report, stage 3)."""
        if self.active and self.main:
            self.embed.item_emb = self.whole.to(device)
            self.active = False

    def _index(self, optimizer: torch.optim.Optimizer) -> int:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return next(i for i, p in enumerate(params) if p is self.shard.weight)

    def full_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """``state`` (torch's format) with the shard's moments gathered whole on rank 0 (every rank calls it)."""
        if not self.active:
            return state
        index = self._index(optimizer)
        entry = state["state"].get(index, {})
        whole = {k: (self.shard.gather_full(v) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in entry.items()}
        return {**state, "state": {**state["state"], index: whole}} if entry else state

    def shard_optimizer(self, optimizer: torch.optim.Optimizer, state: dict | None, fmt: str | None) -> dict | None:
        """A checkpoint's optimizer state with the item table's moments cut to this rank's rows."""
        if not self.active or not state:
            return state
        index = self._index(optimizer)
        key = next((k for k in state["state"] if (str(k).endswith("embed.item_emb.weight") if fmt == "fqn"
                                                   else k == index)), None)
        if key is None:
            return state
        cut = {k: (self.shard.group.shard_of(v) if torch.is_tensor(v) and v.dim() > 0 else v)
               for k, v in state["state"][key].items()}
        return {**state, "state": {**state["state"], key: cut}}


class _WholeItems:
    def __init__(self, shards: ItemShards | None, device: torch.device):
        self.shards, self.device = shards, device

    def __enter__(self) -> None:
        if self.shards is not None:
            self.shards.embed.item_emb = self.shards.whole.to(self.device)

    def __exit__(self, *exc: Any) -> None:
        if self.shards is not None:
            self.shards.whole.cpu()
            self.shards.embed.item_emb = self.shards.shard
