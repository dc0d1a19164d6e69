"""The stage-2 loss of one batch (next-token sampled softmax + MoE balance + ranking + semantic-ID losses), and the
module DDP / FSDP wrap around it (models/distributed.py)."""

from __future__ import annotations

from typing import Any

import torch

from models.losses import sampled_softmax_loss, semantic_contrastive_loss
from models.sharded_items import shard_output, sharded_softmax_loss
from models.train_config import TrainConfig
from models.ugt.model import UGT
from models.ugt.ranking import ranking_loss


def stage2_loss(model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig, codes_t: torch.Tensor | None,
                amp: bool, excluded: torch.Tensor | None = None, teacher: Any = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss and its parts; with a ``teacher`` (models/distill.py) the next-token loss is mixed with the
    KL to the teacher's scores."""
    device_type = batch["ids"].device.type
    core = getattr(model, "_orig_mod", model)
    ranking = isinstance(core, UGT) and core.ranker is not None
    if isinstance(core, UGT) and core.training:
        core.start_step()
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        if ranking:  # the ranking head reads every layer's input of this same forward
            user, aux, kept = model(batch, keep=True)
        else:
            user, aux = model(batch)
        shards = getattr(getattr(getattr(core, "embed", None), "item_emb", None), "group", None)
        table, table_ids = shard_output(core.embed) if shards is not None else (model.item_embeddings(), None)
    targets = batch["targets"]
    if shards is not None:  # the item table row-wise over the ranks (models/sharded_items.py)
        ntp = sharded_softmax_loss(user, targets, table, table_ids, shards, cfg.temperature)
    else:
        fresh = (core.freshness_scores(user[targets > 0].float(), batch["query_times"][targets > 0])
                 if isinstance(core, UGT) else None)
        ntp = sampled_softmax_loss(user, targets, table, cfg.num_negatives, cfg.temperature, excluded=excluded,
                                   logit_bias=fresh)
    parts = {"ntp": float(ntp.detach()), "aux": float(aux.detach())}
    if teacher is not None:
        kd = teacher.loss(user, table, batch, cfg.temperature)
        parts["distill"] = float(kd.detach())
        ntp = (1 - teacher.config.weight) * ntp + teacher.config.weight * kd
    total = ntp + aux.float()
    if ranking:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            rank = ranking_loss(core, user, *kept, batch, table)
        total = total + core.config.heads.ranking_loss_weight * rank
        parts["rank"] = float(rank.detach())
    if isinstance(core, UGT) and codes_t is not None:
        mask = targets > 0
        u = user[mask].float()
        tgt = targets[mask]
        if core.sid_head is not None and core.config.heads.sid_loss_weight > 0:
            sid = core.sid_head.loss(u, codes_t[tgt])
            total = total + core.config.heads.sid_loss_weight * sid
            parts["sid"] = float(sid.detach())
        if cfg.contrastive_weight > 0:
            con = semantic_contrastive_loss(u, core.embed.sid_vectors(tgt).float(), tgt, cfg.contrastive_temperature)
            total = total + cfg.contrastive_weight * con
            parts["contrastive"] = float(con.detach())
    return total, parts


class StepLoss(torch.nn.Module):
    """The stage-2 loss of a batch as a module: what DDP / FSDP wrap (models/distributed.py), so the item table and
    the heads run inside the wrapped forward and their gradients sync with the encoder's."""

    def __init__(self, inner: torch.nn.Module, cfg: TrainConfig, codes_t: torch.Tensor | None, amp: bool,
                 excluded: torch.Tensor | None, teacher: Any = None):
        super().__init__()
        self.inner = inner
        self.cfg, self.codes_t, self.amp, self.excluded = cfg, codes_t, amp, excluded
        self.teacher = teacher  # a plain object, not a submodule: DDP/FSDP never see its frozen weights

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return stage2_loss(self.inner, batch, self.cfg, self.codes_t, self.amp, self.excluded, self.teacher)[0]
