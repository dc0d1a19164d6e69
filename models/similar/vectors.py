"""Item vectors for similar items: a trained UGT's collaborative part (ID rows) beside its content part.

The content part is what the model itself adds to an item's ID row (models/ugt/embedding.py,
``UnifiedEmbedding.item_vectors``): the sum of its semantic-ID code embeddings (when the model embeds items by
semantic ID) plus its metadata features (mean genre embedding + release decade). Each part is L2-normalised
and weighted, the two are concatenated and normalised again, so an inner product is a weighted mix of the two
cosines. An item that arrives after training has no ID row: its collaborative half is zero and it is placed
by content alone, exactly as the served model scores it.

Everything here is numpy: the tables are read once out of a checkpoint (``ItemTables.from_checkpoint``, the
only torch import) and stored in the index artifact, so serving embeds new items without the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def normalized(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    rows = np.asarray(rows, np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


@dataclass
class ItemTables:
    """What embeds an item outside the model: its rows by vocabulary index (row 0 = padding) and the tables.

    ``collab`` (V + 1, D) is the trained ID table, None when the model has no ID part; ``code_table`` /
    ``codes`` (shifted by codebook offsets, 0 = none) are set when the model embeds items by semantic ID.
    """

    item_ids: list[str]  # by vocabulary index 1..V (index 0 is padding and not listed)
    collab: np.ndarray | None
    genre_table: np.ndarray | None  # (G + 1, D); None when genres are not part of the item vector
    genres: np.ndarray  # (V + 1, W) genre indices, 0 = none
    year_table: np.ndarray | None  # (Y + 1, D); None when the decade is not part of the item vector
    years: np.ndarray  # (V + 1,) decade buckets, 0 = unknown
    code_table: np.ndarray | None = None  # (sum of codebook sizes + 1, D)
    codes: np.ndarray | None = None  # (V + 1, L) shifted codes
    codebook_sizes: list[int] = field(default_factory=list)
    genre_names: list[str] = field(default_factory=list)
    sid_version: str = ""  # the semantic-ID artifact version the codes come from (whose feed brings new items)

    @property
    def dim(self) -> int:
        for table in (self.collab, self.code_table, self.genre_table, self.year_table):
            if table is not None:
                return int(table.shape[1])
        raise ValueError("the model has neither ID rows nor content tables: nothing to embed items with")

    @property
    def embeds_new_items(self) -> bool:
        """True when items coded after training can be embedded (the model reads semantic-ID codes)."""
        return self.code_table is not None

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ItemTables:
        """Read the tables out of a `ugt train` checkpoint (its state dict alone: no dataset is re-read)."""
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt.get("model") != "ugt":
            raise ValueError(f"{path}: holds a {ckpt.get('model')!r} model; similar items need a UGT checkpoint")
        return cls.from_state(ckpt["state_dict"], ckpt["model_config"].get("embedding") or {}, ckpt)

    @classmethod
    def from_state(cls, state: dict[str, Any], embedding: dict[str, Any], ckpt: dict[str, Any]) -> ItemTables:
        """From a UGT state dict, its ``embedding`` config (a dict) and the checkpoint's vocab and codes."""

        def table(key: str) -> np.ndarray:
            return state[key].detach().float().cpu().numpy()

        repr_ = str(embedding.get("item_repr", "id"))
        features = bool(embedding.get("output_features", True))
        vocab: dict[str, int] = dict(ckpt["vocab"])
        item_ids = [""] * len(vocab)
        for item_id, index in vocab.items():
            item_ids[index - 1] = str(item_id)
        with_codes = "sid" in repr_ and "embed.code_emb.weight" in state
        meta = ckpt.get("item_meta") or {}
        return cls(
            item_ids=item_ids,
            collab=table("embed.item_emb.weight") if "id" in repr_.split("+") else None,
            genre_table=table("embed.genre_emb.weight") if features and embedding.get("use_genres", True) else None,
            genres=state["embed.item_genres"].cpu().numpy().astype(np.int64),
            year_table=table("embed.year_emb.weight") if features and embedding.get("use_year", True) else None,
            years=state["embed.item_year"].cpu().numpy().astype(np.int64),
            code_table=table("embed.code_emb.weight") if with_codes else None,
            codes=state["embed.item_codes"].cpu().numpy().astype(np.int64) if with_codes else None,
            codebook_sizes=[int(k) for k in ckpt.get("codebook_sizes") or []] if with_codes else [],
            genre_names=[str(g) for g in meta.get("genre_names", [])],
            sid_version=str(ckpt.get("semantic_ids_version") or "") if with_codes else "",
        )

    # -- content ---------------------------------------------------------------------------------------
    def content(self, codes: np.ndarray | None, genres: np.ndarray, years: np.ndarray) -> np.ndarray:
        """Content vectors (n, D) from shifted codes (n, L), genre indices (n, W) and decade buckets (n,)."""
        n = len(years)
        out = np.zeros((n, self.dim), np.float32)
        if self.code_table is not None and codes is not None:
            out += self.code_table[codes].sum(axis=1)  # row 0 (no code) is the zero padding row
        if self.genre_table is not None:
            count = np.maximum((genres > 0).sum(axis=1, keepdims=True), 1)
            rows = self.genre_table[genres] * (genres > 0)[..., None]
            out += rows.sum(axis=1) / count
        if self.year_table is not None:
            out += self.year_table[years] * (years > 0)[:, None]
        return out

    def shift_codes(self, codes: np.ndarray) -> np.ndarray:
        """Unshifted codes (n, L) of new items as rows of ``code_table``; a code no trained item has is 0
        (never trained: the served model drops it too, models/ugt/embedding.py ``set_items``)."""
        assert self.code_table is not None and self.codes is not None
        offsets = np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]).astype(np.int64)
        shifted = np.asarray(codes, np.int64) + offsets + 1
        trained = np.zeros(len(self.code_table), bool)
        trained[self.codes[1:].ravel()] = True
        trained[0] = False
        return np.where(trained[shifted], shifted, 0)

    def new_item_content(self, codes: np.ndarray, genres: np.ndarray, years: np.ndarray) -> np.ndarray:
        """Content vectors of items coded after training, with the served model's rules for unseen parts."""
        g = np.where(genres < (len(self.genre_table) if self.genre_table is not None else 1), genres, 0)
        y = np.minimum(np.asarray(years, np.int64), (len(self.year_table) - 1) if self.year_table is not None else 0)
        return self.content(self.shift_codes(codes), g, y)


@dataclass(frozen=True)
class VectorWeights:
    """How much each half counts in the inner product (each half is unit length before weighting)."""

    collab: float = 1.0
    content: float = 1.0


def combine(collab: np.ndarray | None, content: np.ndarray, weights: VectorWeights) -> np.ndarray:
    """The index vectors: [w_collab * collab / |collab|, w_content * content / |content|] / norm."""
    parts = [weights.content * normalized(content)]
    if collab is not None:
        parts.insert(0, weights.collab * normalized(collab))
    return normalized(np.concatenate(parts, axis=1))


def trained_vectors(tables: ItemTables, weights: VectorWeights) -> np.ndarray:
    """Vectors (V, dim) of every trained item, in ``tables.item_ids`` order."""
    rows = np.arange(1, len(tables.item_ids) + 1)
    content = tables.content(tables.codes[rows] if tables.codes is not None else None,
                             tables.genres[rows], tables.years[rows])
    collab = tables.collab[rows] if tables.collab is not None else None
    return combine(collab, content, weights)


def new_item_vectors(tables: ItemTables, weights: VectorWeights, codes: np.ndarray, genres: np.ndarray,
                     years: np.ndarray) -> np.ndarray:
    """Vectors of items coded after training: no ID row, so a zero collaborative half."""
    content = tables.new_item_content(codes, genres, years)
    collab = np.zeros((len(content), tables.collab.shape[1]), np.float32) if tables.collab is not None else None
    return combine(collab, content, weights)
