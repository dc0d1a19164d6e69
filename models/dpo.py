"""Stage 3 of training, DPO: preference pairs from what users consumed next, and the step that learns from them.

The loop that runs it (epochs, validation, early stopping) is the trainer's (models/train.py); this module
holds what is DPO's own: the pair rule (:func:`preference_pairs`), the log-probabilities of a pair
(:func:`pair_logprobs`), and one optimizer step against the frozen reference (:class:`PreferenceStep`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.data import Batchable
from models.losses import dpo_loss, sampled_softmax_loss
from models.train_config import DPOConfig, TrainConfig


def _next_true(flag: np.ndarray, missing: int) -> np.ndarray:
    """For each position t, the first index >= t where ``flag`` holds (``missing`` if none)."""
    nxt = np.where(flag, np.arange(len(flag)), missing)
    return np.minimum.accumulate(nxt[::-1])[::-1]


def preference_pairs(split: Batchable, dpo: DPOConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DPO pairs from the training rows: for the state at position t, chosen = the nearest of the next
    ``window`` events rated >= ``high`` and rejected = the nearest rated in (0, ``low``].

    Both were actually consumed by the user right after that state, so the pair says "among what came
    next, the model should prefer what the user liked". Returns pos/chosen/rejected arrays [R, P]
    (pos -1 = no pair), at most ``max_pairs_per_row`` random pairs per row.
    """
    R, N = split.targets.shape
    P = dpo.max_pairs_per_row
    pos = np.full((R, P), -1, np.int64)
    chosen = np.zeros((R, P), np.int64)
    rejected = np.zeros((R, P), np.int64)
    big = np.iinfo(np.int64).max // 2
    for r in range(R):
        n = int(split.lengths[r])
        rt = split.target_ratings[r, :n]
        idx = np.arange(n)

        nh = _next_true(rt >= dpo.high, big)
        nl = _next_true((rt > 0) & (rt <= dpo.low), big)
        ok = np.flatnonzero((nh - idx < dpo.window) & (nl - idx < dpo.window))
        if len(ok) == 0:
            continue
        if len(ok) > P:
            ok = np.sort(rng.choice(ok, P, replace=False))
        pos[r, : len(ok)] = ok
        chosen[r, : len(ok)] = split.targets[r, nh[ok]]
        rejected[r, : len(ok)] = split.targets[r, nl[ok]]
    return {"pos": pos, "chosen": chosen, "rejected": rejected}


def pair_logprobs(model: Any, batch: dict[str, torch.Tensor], pos: torch.Tensor, chosen: torch.Tensor,
                  rejected: torch.Tensor, temperature: float, amp: bool, with_aux: bool = False):
    """log p(chosen), log p(rejected) under the full softmax over items, the step's user states (and aux loss)."""
    with torch.autocast(batch["ids"].device.type, dtype=torch.bfloat16, enabled=amp):
        user, aux = model(batch)
        table = model.item_embeddings()
    keep = pos >= 0
    rows = torch.arange(pos.shape[0], device=pos.device).view(-1, 1).expand_as(pos)[keep]
    u = user[rows, pos[keep]].float()
    logp = F.log_softmax(u @ table.float()[1:].T / temperature, dim=-1)
    lc = logp.gather(1, (chosen[keep] - 1).view(-1, 1)).squeeze(1)
    lr = logp.gather(1, (rejected[keep] - 1).view(-1, 1)).squeeze(1)
    return (lc, lr, user, aux) if with_aux else (lc, lr, user)


class PreferenceStep:
    """DPO's optimizer step: the policy against a frozen copy of itself (the reference), + NTP on every position.

    Tracks the policy's preference accuracy on the training pairs (chosen scored above rejected) for the report.
    """

    def __init__(self, model: Any, cfg: TrainConfig, dpo: DPOConfig, split: Batchable, device: torch.device,
                 amp: bool, rng: np.random.Generator):
        self.model, self.cfg, self.dpo, self.device, self.amp = model, cfg, dpo, device, amp
        pairs = preference_pairs(split, dpo, rng)
        self.n_pairs = int((pairs["pos"] >= 0).sum())
        self.pairs = {k: torch.as_tensor(v) for k, v in pairs.items()}
        self.reference = copy.deepcopy(model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=dpo.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        self.accs: list[float] = []
        self.first_acc: float | None = None

    def step(self, batch: dict[str, torch.Tensor], np_batch: dict) -> float:
        model, cfg = self.model, self.cfg
        model.train()
        idx = torch.as_tensor(np_batch["row_index"])
        pos, ch, rj = (self.pairs[k][idx].to(self.device) for k in ("pos", "chosen", "rejected"))
        with torch.no_grad():
            ref_c, ref_r, _ = pair_logprobs(self.reference, batch, pos, ch, rj, cfg.temperature, self.amp)
        # One policy forward serves both losses: DPO on the pairs, NTP on every position.
        pol_c, pol_r, user, aux = pair_logprobs(model, batch, pos, ch, rj, cfg.temperature, self.amp, with_aux=True)
        ntp = sampled_softmax_loss(user, batch["targets"], model.item_embeddings(), cfg.num_negatives,
                                   cfg.temperature) + aux.float()
        pref = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.dpo.beta) if len(pol_c) else ntp.new_zeros(())
        loss = ntp + self.dpo.weight * pref
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if len(pol_c):
            self.accs.append(float((pol_c > pol_r).float().mean()))
        return float(loss.detach())

    def end_epoch(self) -> None:
        """After an epoch: the accuracy of the first epoch with pairs' first quarter, once (the "before")."""
        if self.first_acc is None and self.accs:
            self.first_acc = float(np.mean(self.accs[: max(1, len(self.accs) // 4)]))

    def report(self) -> dict[str, Any]:
        """Pair count, the rule, and preference accuracy at the start and over the last epoch."""
        accs, epochs = self.accs, self.dpo.epochs
        return {"pairs": self.n_pairs, "pair_rule": asdict(self.dpo),
                "preference_acc_first_quarter": self.first_acc,
                "preference_acc_last_epoch": float(np.mean(accs[-max(1, len(accs) // max(1, epochs)):])) if accs
                else None}
