"""HSTU: pointwise aggregated attention (SiLU, no softmax) with relative position + time bias.

References: Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for
Generative Recommendations" (ICML'24), and meta-recsys/generative-recommenders
(``research/modeling/sequential/hstu.py``), whose ML-1M setting this reproduces on dense padded tensors:
  - one fused projection x -> (u, v, q, k) with SiLU;
  - attention weights silu(q.k + rab(i, j)) / n, causal, no softmax (n = the fixed padded length);
  - rab = learned relative-position bias + bias of the bucketed gap ts(query_i) - ts(j), where the
    query time of position i is the time of the event it predicts (the request time at serving);
  - output o(dropout(u * layernorm(attn))) + x (residual).
Sequences are left-aligned (events first, padding after) so causal masking never lets a real position
see padding; keys are still masked by validity for inputs that put padding in front (UGT's long-term tokens).

Layout: blocks (bias, block), then ``HSTUConfig``, then ``HSTU`` (a sequential recommender). The reference
attention and the time buckets live one layer down, in ``models.kernels.reference``, beside the fused kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.kernels.hstu_attention import RelBias, fused_hstu_attention
from models.kernels.reference import bucketize_time_gaps, hstu_attention

__all__ = ["HSTU", "HSTUBlock", "HSTUConfig", "RelativeBucketedTimeAndPositionBias", "bucketize_time_gaps",
           "hstu_attention"]


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """rab[b, i, j] = w_pos[i - j] + w_time[bucket(query_time[b, i] - time[b, j])]."""

    def __init__(self, max_len: int, num_buckets: int = 128):
        super().__init__()
        self.max_len = max_len
        self.num_buckets = num_buckets
        self.pos_w = nn.Parameter(torch.empty(2 * max_len - 1).normal_(mean=0, std=0.02))
        self.ts_w = nn.Parameter(torch.empty(num_buckets + 1).normal_(mean=0, std=0.02))
        pos = torch.arange(max_len)
        self.register_buffer("pos_index", pos.view(-1, 1) - pos.view(1, -1) + max_len - 1, persistent=False)

    def forward(self, times: torch.Tensor, query_times: torch.Tensor) -> torch.Tensor:
        B, N = times.shape
        if N > self.max_len:
            raise ValueError(f"sequence length {N} exceeds the bias table's max_len {self.max_len}")
        pos_bias = self.pos_w[self.pos_index[:N, :N]]  # (N, N)
        buckets = bucketize_time_gaps(query_times.unsqueeze(2) - times.unsqueeze(1), self.num_buckets)
        return pos_bias.unsqueeze(0) + self.ts_w[buckets]  # (B, N, N)


class HSTUBlock(nn.Module):
    """One sequential transduction unit: fused uvqk projection, pointwise attention, gated output."""

    def __init__(self, d_model: int, num_heads: int, dqk: int, dv: int, dropout: float, max_len: int,
                 num_time_buckets: int = 128, rel_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.d_model, self.num_heads, self.dqk, self.dv = d_model, num_heads, dqk, dv
        self.max_len, self.dropout, self.eps = max_len, dropout, eps
        self.uvqk = nn.Parameter(torch.empty(d_model, (2 * dv + 2 * dqk) * num_heads).normal_(mean=0, std=0.02))
        self.o = nn.Linear(dv * num_heads, d_model)
        nn.init.xavier_uniform_(self.o.weight)
        self.rab = RelativeBucketedTimeAndPositionBias(max_len, num_time_buckets) if rel_bias else None
        self.fused = False  # True: models.kernels' Triton attention (bias computed in-kernel), same function

    def forward(self, x: torch.Tensor, times: torch.Tensor, query_times: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        H = self.num_heads
        normed = F.layer_norm(x, (self.d_model,), eps=self.eps)
        u, v, q, k = torch.split(
            F.silu(normed @ self.uvqk), [self.dv * H, self.dv * H, self.dqk * H, self.dqk * H], dim=-1
        )
        if self.fused:
            rel = None if self.rab is None else RelBias(self.rab.pos_w, self.rab.ts_w, times, query_times,
                                                         self.max_len)
            attn = fused_hstu_attention(q.view(B, N, H, self.dqk), k.view(B, N, H, self.dqk),
                                        v.view(B, N, H, self.dv), valid, float(self.max_len), rel=rel)
            gated = u * F.layer_norm(attn, (self.dv * H,), eps=self.eps)
            return x + self.o(F.dropout(gated, p=self.dropout, training=self.training))
        bias = self.rab(times, query_times) if self.rab is not None else None
        attn = hstu_attention(
            q.view(B, N, H, self.dqk), k.view(B, N, H, self.dqk), v.view(B, N, H, self.dv), bias, valid,
            float(self.max_len),
        )
        gated = u * F.layer_norm(attn, (self.dv * H,), eps=self.eps)
        return x + self.o(F.dropout(gated, p=self.dropout, training=self.training))


@dataclass
class HSTUConfig:
    num_items: int = 3883  # item indices 1..num_items (0 = padding)
    max_len: int = 200  # model positions (HSTU's ML-1M: 200 history items)
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dqk: int = 50  # attention dim per head
    dv: int = 50  # linear (value) dim per head
    dropout: float = 0.2  # linear dropout inside blocks
    input_dropout: float = 0.2  # dropout on the input embeddings
    num_time_buckets: int = 128
    rel_bias: bool = True


class HSTU(nn.Module):
    """HSTU as a sequential recommender: item embeddings -> blocks -> L2-normalised user embeddings."""

    def __init__(self, config: HSTUConfig):
        super().__init__()
        self.config = c = config
        self.item_emb = nn.Embedding(c.num_items + 1, c.embedding_dim, padding_idx=0)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        self.pos_emb = nn.Embedding(c.max_len, c.embedding_dim)
        nn.init.xavier_normal_(self.pos_emb.weight)
        self.blocks = nn.ModuleList(
            HSTUBlock(c.embedding_dim, c.num_heads, c.dqk, c.dv, c.dropout, c.max_len, c.num_time_buckets,
                      c.rel_bias)
            for _ in range(c.num_blocks)
        )

    def item_embeddings(self) -> torch.Tensor:
        """All item embeddings (row 0 = padding), L2-normalised as in HSTU's sampled softmax."""
        return F.normalize(self.item_emb.weight, dim=-1, eps=1e-6)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (user embeddings (B, N, D) L2-normalised, auxiliary loss (0 here))."""
        ids = batch["ids"]
        B, N = ids.shape
        valid = ids != 0
        x = self.item_emb(ids) * math.sqrt(self.config.embedding_dim)
        x = x + self.pos_emb(torch.arange(N, device=ids.device)).unsqueeze(0)
        x = F.dropout(x, p=self.config.input_dropout, training=self.training) * valid.unsqueeze(-1)
        for block in self.blocks:
            x = block(x, batch["times"], batch["query_times"], valid)
        return F.normalize(x, dim=-1, eps=1e-6), x.new_zeros(())
