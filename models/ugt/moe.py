"""Mixture-of-Experts FFN (OneRec): top-k routing over experts, with a Switch-style load-balancing loss.

Each token's router picks ``top_k`` experts; their outputs are mixed with the renormalised router
probabilities. The balancing loss is ``E * sum_e f_e * P_e`` (Fedus et al., Switch Transformer): f_e is
the share of routed assignments that went to expert e and P_e the mean router probability of e, over
valid tokens; it is 1 when routing is uniform and grows when a few experts take everything.
Experts are evaluated as one batched matmul and combined with zero weights for unchosen experts: the
same function as sparse dispatch, with static shapes (torch.compile / CUDA graphs friendly); at
MovieLens sizes this is faster than gathering tokens per expert. ``dense=True`` is the switch to one
plain FFN (no router, no balancing loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MoEConfig:
    d_ff: int = 128
    num_experts: int = 4
    top_k: int = 2
    dense: bool = False  # True: a single dense FFN instead of experts
    dropout: float = 0.2
    balance_coef: float = 0.01  # weight of the load-balancing loss in the total loss


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, config: MoEConfig | None = None):
        super().__init__()
        self.config = c = config or MoEConfig()
        if not c.dense and not 1 <= c.top_k <= c.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts], got {c.top_k} of {c.num_experts}")
        experts = 1 if c.dense else c.num_experts
        self.w1 = nn.Parameter(torch.empty(experts, d_model, c.d_ff))
        self.b1 = nn.Parameter(torch.zeros(experts, c.d_ff))
        self.w2 = nn.Parameter(torch.empty(experts, c.d_ff, d_model))
        self.b2 = nn.Parameter(torch.zeros(experts, d_model))
        for w in (self.w1, self.w2):
            for e in range(experts):
                nn.init.xavier_uniform_(w.data[e])
        self.gate = None if c.dense else nn.Linear(d_model, c.num_experts, bias=False)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(combine weights (..., E) with zeros off the top-k, router probs (..., E), top-k indices)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top_p, top_i = probs.topk(self.config.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        return combine, probs, top_i

    def balance_loss(self, probs: torch.Tensor, top_i: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        E = self.config.num_experts
        v = valid.reshape(-1).float()
        n = v.sum().clamp(min=1)
        assign = F.one_hot(top_i.reshape(-1, self.config.top_k), E).float().sum(1)  # (T, E)
        f = (assign * v[:, None]).sum(0) / (n * self.config.top_k)
        p = (probs.reshape(-1, E) * v[:, None]).sum(0) / n
        return E * (f * p).sum()

    def forward(self, x: torch.Tensor, valid: torch.Tensor, with_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, D); valid: (B, L) bool. Returns (output (B, L, D), load-balancing loss).

        ``with_loss=False`` (inference) skips the loss: a dozen small kernels per layer that serving never reads.
        """
        experts = getattr(self, "experts", None)  # int8 inference (models/ugt/quantize.py): per-expert Linears
        if experts is not None:
            y = experts(x)
        else:
            h = torch.einsum("bld,edf->blef", x, self.w1) + self.b1
            h = F.dropout(F.gelu(h), p=self.config.dropout, training=self.training)
            y = torch.einsum("blef,efd->bled", h, self.w2) + self.b2  # (B, L, E, D)
        if self.gate is None:
            return y[:, :, 0], x.new_zeros((), dtype=torch.float32)
        combine, probs, top_i = self.route(x)
        out = (y * combine.unsqueeze(-1).to(y.dtype)).sum(2)
        if not with_loss:
            return out, x.new_zeros((), dtype=torch.float32)
        return out, self.balance_loss(probs, top_i, valid)
