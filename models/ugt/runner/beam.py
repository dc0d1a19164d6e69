"""Constrained generation: the semantic-ID beam search over the served trie, excluded items dropped."""

from __future__ import annotations

import torch

from models.ugt.model import UGT


def generate(model: UGT, user: torch.Tensor, excl: torch.Tensor, beam: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(items (B, beam), log-probs): the trie-constrained beam search, excluded and padding items at -inf."""
    items, logp = model.generate(user.to(dtype), beam)
    banned = (items.unsqueeze(-1) == excl.unsqueeze(1)).any(-1) | (items == 0)
    return items, logp.masked_fill(banned, float("-inf"))


def union_candidates(cands: torch.Tensor, invalid: torch.Tensor, beam_items: torch.Tensor,
                     beam_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval's candidates followed by the beam's items, for the ranker: a beam item retrieval also found
    (or a banned one) becomes padding (item 0) and is marked invalid. Returns (candidates, invalid)."""
    dup = (beam_items.unsqueeze(-1) == cands.unsqueeze(1)).any(-1) | torch.isinf(beam_logp)
    return torch.cat([cands, beam_items.masked_fill(dup, 0)], dim=1), torch.cat([invalid, dup], dim=1)
