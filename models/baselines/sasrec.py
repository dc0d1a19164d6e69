"""SASRec as HSTU's repo trains it (research/modeling/sequential/sasrec.py): the KDD'23 baseline setting.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM'18), with the changes HSTU's repo makes
for its ML-1M baseline (0.2853 HR@10 / 0.1603 NDCG@10): learned positions, embeddings scaled by sqrt(d),
pre-LN attention blocks (``Q = LN(x); x = Q + MHA(Q, x, x)``), a point-wise ReLU FFN with residual,
a final LayerNorm, L2-normalised outputs, and a sampled softmax over L2-normalised item embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SASRecConfig:
    num_items: int = 3883
    max_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    ffn_hidden_dim: int = 50
    dropout: float = 0.2  # input, attention and FFN dropout


class PointWiseFeedForward(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = c = config
        self.item_emb = nn.Embedding(c.num_items + 1, c.embedding_dim, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len, c.embedding_dim)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(c.embedding_dim, eps=1e-8) for _ in range(c.num_blocks))
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(c.embedding_dim, c.num_heads, dropout=c.dropout, batch_first=True)
            for _ in range(c.num_blocks)
        )
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(c.embedding_dim, eps=1e-8) for _ in range(c.num_blocks))
        self.ffns = nn.ModuleList(
            PointWiseFeedForward(c.embedding_dim, c.ffn_hidden_dim, c.dropout) for _ in range(c.num_blocks)
        )
        self.last_norm = nn.LayerNorm(c.embedding_dim, eps=1e-8)
        # HSTU's reset_state: xavier-normal for every matrix outside the item embedding table.
        for name, p in self.named_parameters():
            if name.startswith("item_emb") or p.dim() < 2:
                continue
            nn.init.xavier_normal_(p)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)

    def item_embeddings(self) -> torch.Tensor:
        return F.normalize(self.item_emb.weight, dim=-1, eps=1e-6)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["ids"]
        B, N = ids.shape
        keep = (ids != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.item_emb(ids) * math.sqrt(self.config.embedding_dim)
        x = x + self.pos_emb(torch.arange(N, device=ids.device)).unsqueeze(0)
        x = F.dropout(x, p=self.config.dropout, training=self.training) * keep
        causal = torch.ones(N, N, dtype=torch.bool, device=ids.device).triu(1)  # True = not allowed
        for norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns, strict=True):
            q = norm(x)
            out, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = ffn(ffn_norm(q + out)) * keep
        return F.normalize(self.last_norm(x), dim=-1, eps=1e-6), x.new_zeros(())
