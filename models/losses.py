"""Training losses: sampled softmax (HSTU's), contrastive in semantic-ID space, and DPO.

- ``sampled_softmax_loss`` follows HSTU's SampledSoftmaxLoss with the "local" sampler: for every supervised
  position, ``num_negatives`` items drawn uniformly from the catalog, cosine similarities of L2-normalised
  embeddings divided by a temperature, a negative equal to the positive masked out; ``num_negatives = 0``
  uses every catalog item (full softmax), which is cheap at MovieLens scale.
- ``semantic_contrastive_loss``: InfoNCE between a user state and the embedding of the target's semantic
  ID (sum of its code embeddings), in-batch negatives; items sharing the target's semantic ID are not
  negatives. It pulls user states toward the region of the ID space that the generator decodes.
- ``dpo_loss``: Direct Preference Optimization (Rafailov et al. 2023), as the seed's stage 3: the policy's
  log-probability margin of chosen over rejected, minus the frozen reference's, through -log sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax_loss(user: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor,
                         num_negatives: int = 128, temperature: float = 0.05,
                         generator: torch.Generator | None = None, excluded: torch.Tensor | None = None,
                         logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean sampled-softmax loss over positions with ``targets > 0``.

    user: (..., D) L2-normalised user embeddings; targets: (...) item indices (0 = no target);
    item_table: (V + 1, D) L2-normalised item embeddings (row 0 = padding, never sampled);
    excluded: (V + 1,) bool, items that are never negatives (the cold-start holdout: not in the catalog yet);
    logit_bias: (M, V + 1) added to the cosine scores of the M supervised positions (in their order), before the
    temperature: the item-freshness term (models/ugt/freshness.py).
    """
    mask = targets > 0
    if not bool(mask.any()):
        return user.new_zeros((), dtype=torch.float32)
    u = user[mask].float()  # (M, D)
    pos = targets[mask]
    table = item_table.float()
    pos_logits = (u * table[pos]).sum(-1, keepdim=True)  # (M, 1)
    if logit_bias is not None:
        pos_logits = pos_logits + logit_bias.gather(1, pos.unsqueeze(1))
    num_items = table.shape[0] - 1
    if num_negatives <= 0 or num_negatives >= num_items:
        logits = u @ table[1:].T  # (M, V): every catalog item; the positive sits at column pos - 1
        if logit_bias is not None:
            logits = logits + logit_bias[:, 1:]
        if excluded is not None:
            logits = logits.masked_fill(excluded[1:], float("-inf"))
        return F.cross_entropy(logits / temperature, pos - 1)
    neg = torch.randint(1, num_items + 1, (u.shape[0], num_negatives), device=u.device, generator=generator)
    neg_logits = torch.einsum("md,mrd->mr", u, table[neg])
    if logit_bias is not None:
        neg_logits = neg_logits + logit_bias.gather(1, neg)
    drop = neg == pos.unsqueeze(1)
    if excluded is not None:
        drop = drop | excluded[neg]
    neg_logits = torch.where(drop, torch.full_like(neg_logits, -5e4 * temperature), neg_logits)
    logits = torch.cat([pos_logits, neg_logits], dim=1) / temperature
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def semantic_contrastive_loss(user: torch.Tensor, target_sid_emb: torch.Tensor, target_ids: torch.Tensor,
                              temperature: float = 0.1, max_rows: int = 4096) -> torch.Tensor:
    """InfoNCE between user states (M, D) and their targets' semantic-ID embeddings (M, D).

    Rows whose targets are the same item are not used as each other's negatives. At most ``max_rows``
    rows (a random subset) keep the (M, M) similarity matrix small.
    """
    if user.shape[0] == 0:
        return user.new_zeros((), dtype=torch.float32)
    if user.shape[0] > max_rows:
        pick = torch.randperm(user.shape[0], device=user.device)[:max_rows]
        user, target_sid_emb, target_ids = user[pick], target_sid_emb[pick], target_ids[pick]
    u = F.normalize(user.float(), dim=-1)
    s = F.normalize(target_sid_emb.float(), dim=-1)
    logits = u @ s.T / temperature
    same = target_ids.view(-1, 1) == target_ids.view(1, -1)
    eye = torch.eye(len(target_ids), dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(target_ids), device=u.device))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged; inputs are log-probabilities."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin.float()).mean()
