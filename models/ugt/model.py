"""UGT: unified input embedding -> multi-scale sequence -> N x [HSTU attention -> GLN -> MoE FFN] -> heads.

Reads bottom-up: the config, one layer, then the model. Per layer (the seed's "[Causal Attention] ->
[MoE FFN] -> [GLN]"): an HSTU block (pointwise SiLU attention with relative position + time bias, its
own residual), then the MoE FFN on the Group-LayerNorm'd stream, added back as a residual (GLN sits in
the pre-norm slot so deep stacks train stably).

Input sequence: [long-term tokens (G, type user)] + [recent event tokens (N, type item)], each recent
token also carrying its request's real-time context. Outputs are taken at the N recent positions; each
predicts the event after it. Heads: L2-normalised user state for dot-product retrieval over item output
vectors, and (optional) a next-semantic-ID generator decoded with trie-constrained beam search.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from contracts.tokenizer import TOKEN_GROUP_ITEM
from models.hstu import HSTUBlock
from models.ugt.embedding import EmbeddingConfig, UnifiedEmbedding
from models.ugt.freshness import FreshnessConfig, FreshnessTerm
from models.ugt.gln import GLNConfig, GroupLayerNorm
from models.ugt.heads import HeadsConfig, PrefixTrie, SemanticIDHead
from models.ugt.moe import MoEConfig, MoEFeedForward
from models.ugt.multiscale import LongTermCompressor, MultiScaleConfig, RealTimeContext
from models.ugt.ranking import TargetAwareHead


@dataclass
class UGTConfig:
    num_items: int = 3883
    d_model: int = 64
    num_layers: int = 4
    num_heads: int = 2
    dqk: int = 32  # attention dim per head
    dv: int = 32  # value dim per head
    dropout: float = 0.2
    num_time_buckets: int = 128  # HSTU relative time-bias buckets
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    multiscale: MultiScaleConfig = field(default_factory=MultiScaleConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    gln: GLNConfig = field(default_factory=GLNConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    freshness: FreshnessConfig = field(default_factory=FreshnessConfig)  # item-age logit term (models/ugt/freshness.py)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UGTConfig:
        """Build from a (YAML) dict; unknown keys raise so typos never pass silently."""
        nested = {"embedding": EmbeddingConfig, "multiscale": MultiScaleConfig, "moe": MoEConfig,
                  "gln": GLNConfig, "heads": HeadsConfig, "freshness": FreshnessConfig}
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown UGT config keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in nested:
                sub = nested[key]
                bad = set(value or {}) - set(sub.__dataclass_fields__)
                if bad:
                    raise ValueError(f"unknown {key} config keys: {sorted(bad)}")
                kwargs[key] = sub(**(value or {}))
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def total_len(self) -> int:
        return self.multiscale.long_groups + self.multiscale.recent_len


class UGTLayer(nn.Module):
    def __init__(self, c: UGTConfig):
        super().__init__()
        self.attn = HSTUBlock(c.d_model, c.num_heads, c.dqk, c.dv, c.dropout, c.total_len, c.num_time_buckets)
        self.norm = GroupLayerNorm(c.d_model, c.gln)
        self.ffn = MoEFeedForward(c.d_model, c.moe)
        self.dropout = c.dropout

    def forward(self, x, times, query_times, valid, types):
        x = self.attn(x, times, query_times, valid)
        h, balance = self.ffn(self.norm(x, types), valid)
        return x + F.dropout(h, p=self.dropout, training=self.training), balance


class UGT(nn.Module):
    """The generator. ``forward(batch)`` -> (user states (B, N, D) L2-normalised, auxiliary loss)."""

    def __init__(self, config: UGTConfig, item_genres: np.ndarray | None = None, item_year: np.ndarray | None = None,
                 item_codes: np.ndarray | None = None, codebook_sizes: list[int] | None = None,
                 item_release: np.ndarray | None = None, event_log: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        self.config = c = config
        self.embed = UnifiedEmbedding(c.d_model, c.num_items, c.total_len, c.embedding, item_genres, item_year,
                                      item_codes, codebook_sizes)
        self.freshness = (FreshnessTerm(c.d_model, c.num_items, c.freshness, item_release, event_log)
                          if c.freshness.enabled else None)
        self.compressor = LongTermCompressor(c.d_model, c.multiscale) if c.multiscale.long_groups > 0 else None
        self.context = RealTimeContext(c.d_model) if c.multiscale.use_context else None
        self.layers = nn.ModuleList(UGTLayer(c) for _ in range(c.num_layers))
        self.sid_head = (
            SemanticIDHead(c.d_model, list(codebook_sizes))
            if c.heads.semantic_id and codebook_sizes and item_codes is not None else None
        )
        self.ranker = TargetAwareHead(c.d_model) if c.heads.ranking else None
        self.trie: PrefixTrie | None = None
        if self.sid_head is not None:
            self.trie = PrefixTrie(np.asarray(item_codes)[1:], list(codebook_sizes))

    def item_embeddings(self) -> torch.Tensor:
        return self.embed.output_table()

    def start_step(self) -> None:
        """Before a training step: draw which young items go without their ID row this step (freshness.idless_share),
        for their input tokens, their output rows and their freshness values alike."""
        if self.freshness is None or self.freshness.config.idless_share <= 0:
            return
        young = self.freshness.young()
        draw = torch.rand(young.shape, device=young.device) < self.freshness.config.idless_share
        self.embed.set_id_drop(young & draw)

    def freshness_scores(self, user: torch.Tensor, query_times: torch.Tensor) -> torch.Tensor | None:
        """The item-age term (M, V + 1) to add to the cosine scores of ``user`` (M, D) at ``query_times`` (M,),
        or None without freshness. In training mode the step's dropped items take the ID-less values."""
        if self.freshness is None:
            return None
        drop = self.embed.id_drop if self.training and self.embed.drops_ids else None
        return self.freshness(user, query_times, self.freshness.idless(drop))

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at the recent positions (B, N, D) and the summed MoE balancing loss."""
        hidden, balance, _ = self.encode_layers(batch)
        return hidden, balance

    def encode_layers(self, batch: dict[str, torch.Tensor], keep: bool = False):
        """:meth:`encode` plus, with ``keep``, what the ranking head reads of the history: (layer inputs,
        times, valid) of the full sequence (long-term tokens first)."""
        x, times, query_times, valid, types = self.sequence_inputs(batch)
        G = x.shape[1] - batch["ids"].shape[1]
        balance = x.new_zeros((), dtype=torch.float32)
        inputs = []
        for layer in self.layers:
            if keep:
                inputs.append(x)
            x, b = layer(x, times, query_times, valid, types)
            balance = balance + b
        return x[:, G:], balance * self.config.moe.balance_coef, ((inputs, times, valid) if keep else None)

    def sequence_inputs(self, batch: dict[str, torch.Tensor]):
        """The layer stack's input: (x (B, G + N, D), times, query_times, valid, types), long-term tokens first.

        Split from :meth:`encode` so the inference path (KV cache, fused kernel) embeds exactly as training.
        """
        ids = batch["ids"]
        B, N = ids.shape
        c = self.config
        if N > c.multiscale.recent_len:
            raise ValueError(f"batch has {N} positions, config.multiscale.recent_len is {c.multiscale.recent_len}")
        G = c.multiscale.long_groups
        valid = ids != 0
        types = torch.full_like(ids, TOKEN_GROUP_ITEM)
        positions = (torch.arange(N, device=ids.device) + G).unsqueeze(0).expand(B, N)
        x = self.embed(ids, batch["ratings"], batch["gaps"], types, positions)
        if self.context is not None:
            x = x + self.context(batch["query_times"], batch["query_gaps"]) * valid.unsqueeze(-1).to(x.dtype)
        times, query_times = batch["times"], batch["query_times"]
        if self.compressor is not None:
            long_ids, long_times = batch["long_ids"], batch["long_times"]
            long_vec = self.embed.item_vectors(long_ids) * (long_ids != 0).unsqueeze(-1).to(x.dtype)
            tokens, lvalid, ltimes, ltypes = self.compressor(long_vec, long_ids, long_times)
            lpos = torch.arange(G, device=ids.device)
            tokens = tokens + (self.embed.type_emb(ltypes) + self.embed.pos_emb(lpos)) * lvalid.unsqueeze(-1)
            x = torch.cat([tokens.to(x.dtype), x], dim=1)
            valid = torch.cat([lvalid, valid], dim=1)
            types = torch.cat([ltypes, types], dim=1)
            times = torch.cat([ltimes, times], dim=1)
            query_times = torch.cat([ltimes, query_times], dim=1)
        return x, times, query_times, valid, types

    def forward(self, batch: dict[str, torch.Tensor], keep: bool = False):
        """(user states L2-normalised, aux loss), plus with ``keep`` the ranking head's inputs (:meth:`encode_layers`)."""
        hidden, aux, kept = self.encode_layers(batch, keep)
        user = F.normalize(hidden, dim=-1, eps=1e-6)
        return (user, aux, kept) if keep else (user, aux)

    def generate(self, user: torch.Tensor, beam_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item generation by constrained beam search over semantic IDs: (items (B, K), log-probs)."""
        if self.sid_head is None or self.trie is None:
            raise RuntimeError("this UGT has no semantic-ID head (heads.semantic_id off or no semantic IDs)")
        if self.trie.leaf_item.device != user.device:
            self.trie.to(user.device)
        return self.sid_head.beam_search(user, self.trie, beam_size or self.config.heads.beam_size)
