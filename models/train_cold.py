"""Cold-start holdouts in training: which items are held out, and how they look to the model (as served live)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.data import SequenceData, cold_item_mask
from models.train_config import DPOConfig, TrainConfig


@torch.no_grad()
def hold_out_features(embed: Any, cold: torch.Tensor) -> None:
    """Describe the held-out items as the serving live catalog would: no ID row, and no part that only they have
    (the model never trains it): a semantic-ID code no other item has is dropped, a newer decade is clamped to the
    latest one the other items have, a genre only they have is dropped
    (:meth:`models.ugt.embedding.UnifiedEmbedding.set_items` applies the same rule to items coded after training)."""
    embed.item_emb.weight[cold] = 0
    if getattr(embed, "content_tower", None) is not None:
        embed.has_id[cold] = False
    warm = ~cold
    warm[0] = False
    if embed.item_codes is not None:
        codes = embed.item_codes[cold]
        embed.item_codes[cold] = torch.where(torch.isin(codes, embed.item_codes[warm].unique()), codes,
                                             torch.zeros_like(codes))
    latest = int(embed.item_year[warm].max())
    embed.item_year[cold] = embed.item_year[cold].clamp(max=latest)
    genres = embed.item_genres[cold]
    known = torch.isin(genres, embed.item_genres[warm].unique())
    embed.item_genres[cold] = torch.where(known, genres, torch.zeros_like(genres))


def cold_holdout(cfg: TrainConfig, data: SequenceData) -> tuple[np.ndarray | None, bool]:
    """(the cold-start item mask or None, whether training holds those items out)."""
    cold = cold_item_mask(data, {k: v for k, v in (cfg.cold_items or {}).items() if k != "holdout"})
    holdout = cold is not None and bool((cfg.cold_items or {}).get("holdout", True))
    if holdout and cfg.model != "ugt":
        raise ValueError("cold_items holdout needs model: ugt (new items are embedded by semantic ID and metadata)")
    dpo = DPOConfig(**(cfg.dpo or {}))
    if holdout and dpo.enabled and dpo.epochs > 0:
        raise ValueError("cold_items holdout with DPO (stage 3) is not supported: set dpo.enabled=false")
    if holdout and cfg.distill:
        raise ValueError("cold_items holdout with distill is not supported: the teacher scores the held-out items")
    return cold, holdout
