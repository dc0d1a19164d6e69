"""Unified input embedding: item (ID and/or semantic-ID tokens) + position + token type + time + features.

One vector per event token (HSTU-style, the event's parts summed rather than interleaved, which keeps the
sequence short): the item's identity (its ID row, or the sum of its semantic-ID code embeddings, or
both), the event's rating token and time-gap bucket from :mod:`contracts.tokenizer`, the item's genres and
release decade, a token-type embedding (the GLN group) and a learned position. The item part is also the
output item representation used for retrieval, so input and output share one space (as HSTU does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from contracts.tokenizer import NUM_RATING_TOKENS, NUM_TIME_GAP_BUCKETS

ITEM_REPRS = ("id", "sid", "id+sid")


@dataclass
class EmbeddingConfig:
    item_repr: str = "id"  # "id" | "sid" | "id+sid": how an item token is embedded
    use_rating: bool = True  # rating token of the event
    use_gap: bool = True  # time-gap bucket since the previous event
    use_genres: bool = True  # item genres (mean of genre embeddings)
    use_year: bool = True  # item release decade
    output_features: bool = True  # genres/year/semantic ID also in the output item vectors
    num_types: int = 4
    dropout: float = 0.2
    # training only: the share of item occurrences (inputs and output-table rows) embedded WITHOUT their ID row,
    # so the semantic-ID + metadata part alone learns to stand for an item: what an item coded after training has
    id_dropout: float = 0.0
    # an MLP from an item's semantic-ID + metadata vector to an ID vector, standing in for the ID row of items that
    # have none (items coded after training, the cold-start holdout) and, with id_dropout, of dropped occurrences
    content_tower: bool = False
    # > 0: serving scores items without an ID row by their stream vectors (models/ugt/stream_items.py): blend count
    # k, and the share of the mean training state (buffer stream_mean, set by `ugt train`) taken out of their means
    stream_k: float = 0.0
    stream_center: float = 0.7
    # the length of a stream row (1 = a trained row's): < 1 scales a new item's cosine down, keeping its order
    # among new items, so it displaces fewer trained items from everyone's top k (docs/RESULTS.md, cold start)
    stream_scale: float = 1.0


class UnifiedEmbedding(nn.Module):
    """Embeds event tokens; holds item metadata (genres, year, semantic-ID codes) as buffers."""

    def __init__(self, d_model: int, num_items: int, max_positions: int, config: EmbeddingConfig,
                 item_genres: np.ndarray | None = None, item_year: np.ndarray | None = None,
                 item_codes: np.ndarray | None = None, codebook_sizes: list[int] | None = None):
        super().__init__()
        if config.item_repr not in ITEM_REPRS:
            raise ValueError(f"item_repr must be one of {ITEM_REPRS}, got {config.item_repr!r}")
        if "sid" in config.item_repr and (item_codes is None or not codebook_sizes):
            raise ValueError("item_repr uses semantic IDs but no item_codes/codebook_sizes were given")
        self.config, self.d_model, self.num_items = config, d_model, num_items
        genres = np.zeros((num_items + 1, 1), np.int64) if item_genres is None else item_genres
        year = np.zeros(num_items + 1, np.int64) if item_year is None else item_year
        self.register_buffer("item_genres", torch.as_tensor(genres, dtype=torch.long), persistent=True)
        self.register_buffer("item_year", torch.as_tensor(year, dtype=torch.long), persistent=True)
        self.item_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        self.codebook_sizes = list(codebook_sizes or [])
        if item_codes is not None and self.codebook_sizes:
            offsets = np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]).astype(np.int64)
            shifted = np.asarray(item_codes, np.int64) + offsets + 1  # 0 = padding row
            shifted[0] = 0
            self.register_buffer("item_codes", torch.as_tensor(shifted), persistent=True)
            self.code_emb = nn.Embedding(int(sum(self.codebook_sizes)) + 1, d_model, padding_idx=0)
            nn.init.trunc_normal_(self.code_emb.weight, std=0.02)
        else:
            self.item_codes = None
            self.code_emb = None
        self.content_tower = (nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))
                              if config.content_tower else None)
        if self.content_tower is not None:  # which items have a trained ID row (False: the tower stands in)
            self.register_buffer("has_id", torch.ones(num_items + 1, dtype=torch.bool), persistent=True)
        if config.stream_k > 0:  # the mean state before the training events (models.ugt.stream_items.mean_state)
            self.register_buffer("stream_mean", torch.zeros(d_model), persistent=True)
        # training only: items embedded without their ID row this step (models.ugt.freshness, idless_share)
        self.register_buffer("id_drop", torch.zeros(num_items + 1, dtype=torch.bool), persistent=False)
        self.drops_ids = False
        self.genre_emb = nn.Embedding(int(genres.max()) + 1, d_model, padding_idx=0)
        self.year_emb = nn.Embedding(int(year.max()) + 1, d_model, padding_idx=0)
        self.rating_emb = nn.Embedding(NUM_RATING_TOKENS, d_model)
        self.gap_emb = nn.Embedding(NUM_TIME_GAP_BUCKETS, d_model)
        self.type_emb = nn.Embedding(config.num_types, d_model)
        self.pos_emb = nn.Embedding(max_positions, d_model)
        for emb in (self.genre_emb, self.year_emb, self.rating_emb, self.gap_emb, self.type_emb, self.pos_emb):
            nn.init.trunc_normal_(emb.weight, std=0.02)

    def sid_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Sum of the item's semantic-ID code embeddings (..., D); zeros without semantic IDs."""
        if self.code_emb is None:
            return self.item_emb.weight.new_zeros(*ids.shape, self.d_model)
        return self.code_emb(self.item_codes[ids]).sum(-2)

    def feature_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Item metadata part: mean genre embedding + decade embedding."""
        out = self.item_emb.weight.new_zeros(*ids.shape, self.d_model)
        if self.config.use_genres:
            g = self.item_genres[ids]
            count = (g > 0).sum(-1, keepdim=True).clamp(min=1)
            out = out + self.genre_emb(g).sum(-2) / count
        if self.config.use_year:
            out = out + self.year_emb(self.item_year[ids])
        return out

    def item_vectors(self, ids: torch.Tensor, with_features: bool = True,
                     id_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The item token content (..., D): ID and/or semantic-ID part, plus metadata features. ``id_rows`` are the
        ID rows of ``ids`` when the caller already holds them (a rank's own shard: models/sharded_items.py)."""
        repr_ = self.config.item_repr
        if "id" in repr_.split("+"):
            out = self.item_emb(ids) if id_rows is None else id_rows
            keep = None
            if self.training and self.config.id_dropout > 0:
                keep = torch.rand(ids.shape, device=ids.device) >= self.config.id_dropout
            if self.content_tower is not None:
                use = ~self.has_id[ids] if keep is None else ~(self.has_id[ids] & keep)
                stand_in = self.content_tower(self.sid_vectors(ids) + self.feature_vectors(ids))
                out = torch.where(use.unsqueeze(-1), stand_in.to(out.dtype), out)
            elif keep is not None:
                out = out * keep.unsqueeze(-1).to(out.dtype)
            if self.training and self.drops_ids:
                out = out * (~self.id_drop[ids]).unsqueeze(-1).to(out.dtype)
        else:
            out = self.item_emb.weight.new_zeros(*ids.shape, self.d_model)
        if "sid" in repr_:
            out = out + self.sid_vectors(ids)
        if with_features:
            out = out + self.feature_vectors(ids)
        return out

    def output_table(self) -> torch.Tensor:
        """L2-normalised output vectors of every item row (row 0 = padding) for retrieval / softmax.

        After :meth:`reserve`, the unused rows come out as zero vectors: callers keep them out of a top-k.
        """
        ids = torch.arange(self.item_emb.num_embeddings, device=self.item_emb.weight.device)
        return self.output_vectors(ids)

    def output_vectors(self, ids: torch.Tensor, id_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of :meth:`output_table` for the given item indices (``id_rows``: see :meth:`item_vectors`)."""
        return F.normalize(self.item_vectors(ids, self.config.output_features, id_rows), dim=-1, eps=1e-6)

    @torch.no_grad()
    def set_id_drop(self, drop: torch.Tensor) -> None:
        """Items (V + 1 bool) whose ID row is left out while training, until the next call."""
        self.id_drop.copy_(drop)
        self.drops_ids = True

    @property
    def capacity(self) -> int:
        """How many item indices the tables hold (trained items plus :meth:`reserve`'d rows)."""
        return self.item_emb.num_embeddings - 1

    def reserve(self, extra: int) -> None:
        """Grow every per-item table by ``extra`` empty rows for items that arrive after training (serving only).

        A new item has no trained ID row (its ID part stays zero): it is embedded by its semantic-ID codes and
        metadata, the parts it shares with trained items. Shapes are fixed from here on, so compiled steps and
        CUDA graphs stay valid while :meth:`set_items` fills rows in place.
        """
        if extra <= 0:
            return
        weight = self.item_emb.weight
        grown = torch.cat([weight.detach(), weight.new_zeros(extra, weight.shape[1])])
        self.item_emb = nn.Embedding.from_pretrained(grown, freeze=True, padding_idx=0)
        self.item_genres = torch.cat([self.item_genres, self.item_genres.new_zeros(extra, self.item_genres.shape[1])])
        self.item_year = torch.cat([self.item_year, self.item_year.new_zeros(extra)])
        self.id_drop = torch.cat([self.id_drop, self.id_drop.new_zeros(extra)])
        if self.content_tower is not None:
            self.has_id = torch.cat([self.has_id, self.has_id.new_zeros(extra)])
        if self.item_codes is not None:
            # the code rows some trained item uses: a new item's code that no trained item has was never trained
            self.trained_codes = torch.zeros(self.code_emb.num_embeddings, dtype=torch.bool, device=weight.device)
            self.trained_codes[self.item_codes[1 : self.num_items + 1].flatten()] = True
            self.trained_codes[0] = False
            self.item_codes = torch.cat([self.item_codes, self.item_codes.new_zeros(extra, self.item_codes.shape[1])])

    @torch.no_grad()
    def set_items(self, ids: torch.Tensor, codes: np.ndarray | None, genres: np.ndarray, years: np.ndarray) -> None:
        """Describe reserved rows ``ids``: semantic-ID codes (n, L) unshifted, genre indices (n, G) (0 = none,
        wider lists cut), decade buckets (n,). The ID rows stay zero, and so does any part the model never trained:
        a code no trained item has (new items often open a new first-level cluster), a genre beyond the table, a
        decade past the latest (clamped to it)."""
        n = len(ids)
        g = np.zeros((n, self.item_genres.shape[1]), dtype=np.int64)
        width = min(g.shape[1], genres.shape[1]) if genres.ndim == 2 else 0
        g[:, :width] = genres[:, :width]
        g[g >= self.genre_emb.num_embeddings] = 0  # a genre the model never saw: no genre token
        years = np.minimum(np.asarray(years, np.int64), self.year_emb.num_embeddings - 1)  # newer: latest decade
        self.item_genres[ids] = torch.as_tensor(g, device=ids.device)
        self.item_year[ids] = torch.as_tensor(years, device=ids.device)
        if self.item_codes is not None:
            if codes is None:
                raise ValueError("this model embeds items by semantic ID: new items need their codes")
            offsets = np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]).astype(np.int64)
            shifted = torch.as_tensor(np.asarray(codes, np.int64) + offsets + 1, device=ids.device)
            trained = getattr(self, "trained_codes", None)
            if trained is not None:
                shifted = torch.where(trained[shifted], shifted, torch.zeros_like(shifted))
            self.item_codes[ids] = shifted

    def forward(self, ids: torch.Tensor, ratings: torch.Tensor, gaps: torch.Tensor, token_types: torch.Tensor,
                positions: torch.Tensor | None, position_vector: torch.Tensor | None = None) -> torch.Tensor:
        """Event tokens (B, N, D); padding rows (ids == 0) come out as zeros.

        ``position_vector`` (D,) replaces the learned position of ``positions``: ranking candidates sit after
        the whole history, where no absolute position was trained (:mod:`models.ugt.ranking`).
        """
        x = self.item_vectors(ids) * math.sqrt(self.d_model)
        if self.config.use_rating:
            x = x + self.rating_emb(ratings)
        if self.config.use_gap:
            x = x + self.gap_emb(gaps)
        x = x + self.type_emb(token_types) + (self.pos_emb(positions) if position_vector is None else position_vector)
        x = F.dropout(x, p=self.config.dropout, training=self.training)
        return x * (ids != 0).unsqueeze(-1).to(x.dtype)
