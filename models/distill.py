"""Distillation: train a smaller student (the run's own config) on a trained teacher's scores.

``distill: {teacher: runs/ugt-ml1m/checkpoint.pt, weight: 0.5, temperature: 2.0}`` in a training config adds, at
every training position, the KL divergence from the teacher's distribution over the whole catalog to the student's
(Hinton et al.: both score vectors divided by ``temperature``, the KL scaled by its square), and the next-token loss
is weighted by ``1 - weight``. Scores are each model's own logits: the dot product of its L2-normalised user state and
item table over its training temperature. The teacher is frozen (eval mode, no gradients), loaded from its checkpoint
with the run's vocabulary; it reads the same batch, so its ``max_len`` and long history must be the student's.

Full-catalog scores cost (positions x items) per step: fine for MovieLens-sized catalogs; a 1M-item catalog needs a
sampled or top-k variant (not built).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint, long_history_len
from models.data import SequenceData
from models.train_config import TrainConfig


@dataclass
class DistillConfig:
    teacher: str = ""  # the teacher's checkpoint.pt (`ugt train` on the same dataset)
    weight: float = 0.5  # loss = (1 - weight) * next-token loss + weight * KL(teacher || student)
    temperature: float = 2.0  # softens both distributions; the KL is scaled by its square

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("distill needs teacher: the teacher's checkpoint.pt")
        if not 0.0 <= self.weight <= 1.0 or self.temperature <= 0:
            raise ValueError(f"distill weight must be in [0, 1] and temperature > 0, got {self.weight} and "
                             f"{self.temperature}")


class Teacher:
    """A frozen trained model whose scores the student learns (:meth:`loss`)."""

    def __init__(self, spec: dict[str, Any], cfg: TrainConfig, data: SequenceData, device: torch.device):
        self.config = DistillConfig(**spec)
        if not Path(self.config.teacher).is_file():
            raise FileNotFoundError(f"distill.teacher: no such checkpoint {self.config.teacher}")
        model, teacher_cfg, _, _ = load_checkpoint(self.config.teacher, data=data, map_location=str(device))
        if teacher_cfg.max_len != cfg.max_len or long_history_len(teacher_cfg) != long_history_len(cfg):
            raise ValueError(f"distill.teacher reads the student's batches: its max_len {teacher_cfg.max_len} and "
                             f"long history {long_history_len(teacher_cfg)} must be the student's ({cfg.max_len}, "
                             f"{long_history_len(cfg)})")
        self.model = model.to(device).eval().requires_grad_(False)
        self.scale = 1.0 / teacher_cfg.temperature
        with torch.no_grad():
            self.table = self.model.item_embeddings().float()[1:]  # (V, D): the catalog, padding row dropped

    def loss(self, user: torch.Tensor, table: torch.Tensor, batch: dict[str, torch.Tensor],
             student_temperature: float) -> torch.Tensor:
        """KL(teacher || student) per training position, averaged, times temperature squared."""
        mask = batch["targets"] > 0
        tau = self.config.temperature
        with torch.no_grad():
            teacher_user, _ = self.model(batch)
            teacher_logits = (teacher_user[mask].float() @ self.table.T) * (self.scale / tau)
        student_logits = (user[mask].float() @ table[1:].float().T) / (student_temperature * tau)
        kl = F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                      reduction="batchmean")
        return kl * tau**2
