"""Feature item encoders beyond text: structured fields (genres, year, attributes) and collaborative embeddings.

Structured fields add what text misses; the collaborative encoder adds behaviour (a trained model's item
embedding rows) once there is some, and zeros for items the table lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.semantic_ids.encoders import EncoderError, ItemEncoder, check_batch, register_encoder, stable_hash


@register_encoder("structured")
class StructuredEncoder(ItemEncoder):
    """Multi-hot list fields (genres/categories), one-hot year buckets, hashed key=value attributes.

    Vocabularies are learned by :meth:`fit` and stored; a value never seen at fit time (a new genre) falls into
    the hashed block instead of being dropped, so new items still carry it.
    """

    def __init__(
        self,
        multi_hot: Sequence[str] = ("genres",),
        year_buckets: Sequence[int] = (1930, 1950, 1960, 1970, 1980, 1985, 1990, 1995, 1998, 2000),
        hash_dim: int = 32,
        hash_attributes: bool = True,
        vocab: Mapping[str, Sequence[str]] | None = None,
    ):
        if hash_dim < 0:
            raise EncoderError("structured hash_dim must be >= 0")
        if list(year_buckets) != sorted(year_buckets):
            raise EncoderError(f"structured year_buckets must be increasing, got {list(year_buckets)}")
        self.multi_hot = [str(f) for f in multi_hot]
        self.year_buckets = [int(y) for y in year_buckets]
        self.hash_dim = int(hash_dim)
        self.hash_attributes = bool(hash_attributes)
        self.vocab: dict[str, list[str]] | None = (
            {k: list(v) for k, v in vocab.items()} if vocab is not None else None
        )

    def fit(self, items: Sequence[Mapping[str, Any]]) -> StructuredEncoder:
        canon = check_batch(items)
        self.vocab = {f: sorted({str(v) for it in canon for v in self._values(it, f)}) for f in self.multi_hot}
        return self

    @staticmethod
    def _values(item: dict[str, Any], field: str) -> list[str]:
        value = item.get(field)
        if value is None:
            value = item["attributes"].get(field)
        if value is None:
            return []
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]

    def _require_vocab(self) -> dict[str, list[str]]:
        if self.vocab is None:
            raise EncoderError("structured encoder is not fitted: call fit(items) first (it learns the vocabularies)")
        return self.vocab

    @property
    def dim(self) -> int:
        vocab = self._require_vocab()
        return sum(len(vocab[f]) for f in self.multi_hot) + len(self.year_buckets) + 2 + self.hash_dim

    def encode(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        vocab = self._require_vocab()
        canon = check_batch(items)
        index = {f: {v: i for i, v in enumerate(vocab[f])} for f in self.multi_hot}
        out = np.zeros((len(canon), self.dim), np.float32)
        for row, it in enumerate(canon):
            offset, unknown = 0, []
            for f in self.multi_hot:
                for v in self._values(it, f):
                    j = index[f].get(v)
                    if j is None:
                        unknown.append(f"{f}={v}")
                    else:
                        out[row, offset + j] = 1.0
                offset += len(vocab[f])
            # year: bucket 0 = unknown, 1.. = intervals between the edges
            year = it["year"]
            bucket = 0 if year is None else 1 + int(np.searchsorted(self.year_buckets, year, side="right"))
            out[row, offset + bucket] = 1.0
            offset += len(self.year_buckets) + 2
            if self.hash_dim:
                keys = unknown
                if self.hash_attributes:
                    keys = keys + [
                        f"{k}={v}" for k, v in sorted(it["attributes"].items()) if k != "year" and k not in self.multi_hot
                    ]
                for key in keys:
                    h = stable_hash(key)
                    out[row, offset + h % self.hash_dim] += 1.0 if (h >> 63) & 1 else -1.0
        return out

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        options = {
            "multi_hot": self.multi_hot,
            "year_buckets": self.year_buckets,
            "hash_dim": self.hash_dim,
            "hash_attributes": self.hash_attributes,
            "vocab": self._require_vocab(),
        }
        return options, {}

    @classmethod
    def from_state(cls, options: dict[str, Any], arrays: dict[str, np.ndarray]) -> StructuredEncoder:
        return cls(**options)


def _load_ids(path: Path) -> list[str]:
    if path.suffix == ".json":
        return [str(x) for x in json.loads(path.read_text())]
    if path.suffix == ".npy":
        return [str(x) for x in np.load(path, allow_pickle=False).tolist()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _from_checkpoint(path: Path, key: str) -> Any:
    import torch  # lazy: only the collaborative encoder's fit on a checkpoint needs it

    obj = torch.load(path, map_location="cpu", weights_only=False)
    parts, i = key.split("."), 0
    while i < len(parts):  # "model.item_emb.weight": nested dicts, or state-dict keys with dots in them
        if not isinstance(obj, Mapping):
            raise EncoderError(f"checkpoint {path}: {'.'.join(parts[:i])!r} is a {type(obj).__name__}, not a mapping")
        for j in range(len(parts), i, -1):
            candidate = ".".join(parts[i:j])
            if candidate in obj:
                obj, i = obj[candidate], j
                break
        else:
            raise EncoderError(f"checkpoint {path} has no {key!r} (stuck at {parts[i]!r}; keys there: {list(obj)[:20]})")
    return obj.detach().cpu().numpy() if hasattr(obj, "detach") else obj


@register_encoder("collab")
class CollaborativeEncoder(ItemEncoder):
    """Rows of a trained model's item embedding table; items the table lacks (new items) get zeros.

    Source: ``path`` to a ``.npy`` ``[rows, d]`` or a torch checkpoint (``key`` names the tensor, e.g.
    ``model.item_emb.weight``). Which row is which item: ``item_ids`` (a .json/.txt/.npy file, or for a
    checkpoint a key inside it) listing one id per row, else ``row = int(item_id) + row_offset``.
    The fitted rows are stored in the artifact, so serving never needs the checkpoint.
    """

    def __init__(
        self,
        path: str | None = None,
        key: str | None = None,
        item_ids: str | None = None,
        row_offset: int = 0,
        table: np.ndarray | None = None,
        table_ids: Sequence[str] | None = None,
    ):
        self.path, self.key, self.item_ids_source, self.row_offset = path, key, item_ids, int(row_offset)
        self.table = None if table is None else np.asarray(table, np.float32)
        self.table_ids = None if table_ids is None else [str(x) for x in table_ids]

    def _load_source(self) -> tuple[np.ndarray, list[str] | None]:
        if not self.path:
            raise EncoderError("collab encoder needs `path:` (a .npy table or a torch checkpoint)")
        path = Path(self.path)
        if not path.exists():
            raise EncoderError(f"collab embedding table {path} does not exist (train a model first, or drop this part)")
        if path.suffix == ".npy":
            table = np.load(path, allow_pickle=False)
            ids = _load_ids(Path(self.item_ids_source)) if self.item_ids_source else None
        else:
            if not self.key:
                raise EncoderError(f"collab encoder on checkpoint {path} needs `key:` (the item embedding tensor)")
            table = np.asarray(_from_checkpoint(path, self.key))
            ids = None
            if self.item_ids_source:
                src = Path(self.item_ids_source)
                ids = _load_ids(src) if src.exists() else [str(x) for x in _from_checkpoint(path, self.item_ids_source)]
        if table.ndim != 2:
            raise EncoderError(f"collab table from {path} must be 2-D [rows, dim], got shape {table.shape}")
        if ids is not None and len(ids) != len(table):
            raise EncoderError(f"collab table has {len(table)} rows but {len(ids)} item ids")
        return table.astype(np.float32), ids

    def fit(self, items: Sequence[Mapping[str, Any]]) -> CollaborativeEncoder:
        table, ids = self._load_source()
        canon = check_batch(items)
        if ids is not None:
            row_of = {item_id: i for i, item_id in enumerate(ids)}
            rows = [row_of.get(it["item_id"]) for it in canon]
        else:
            rows = []
            for it in canon:
                try:
                    r = int(it["item_id"]) + self.row_offset
                except ValueError as exc:
                    raise EncoderError(
                        f"collab encoder: item id {it['item_id']!r} is not an integer; give `item_ids:` for the table"
                    ) from exc
                rows.append(r if 0 <= r < len(table) else None)
        keep = [(it["item_id"], r) for it, r in zip(canon, rows, strict=True) if r is not None]
        if not keep:
            raise EncoderError("collab table covers none of the catalog's items; check item_ids / row_offset")
        self.table_ids = [k for k, _ in keep]
        self.table = table[[r for _, r in keep]]
        return self

    def _require_table(self) -> tuple[np.ndarray, list[str]]:
        if self.table is None or self.table_ids is None:
            raise EncoderError("collab encoder is not fitted: call fit(items) first")
        return self.table, self.table_ids

    @property
    def dim(self) -> int:
        return int(self._require_table()[0].shape[1])

    def encode(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        table, ids = self._require_table()
        row_of = getattr(self, "_row_of", None)
        if row_of is None:
            row_of = self._row_of = {item_id: i for i, item_id in enumerate(ids)}
        out = np.zeros((len(items), table.shape[1]), np.float32)
        for n, it in enumerate(check_batch(items)):
            r = row_of.get(it["item_id"])
            if r is not None:
                out[n] = table[r]
        return out

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        table, ids = self._require_table()
        options = {"path": self.path, "key": self.key, "item_ids": self.item_ids_source, "row_offset": self.row_offset}
        return options, {"table": table, "table_ids": np.asarray(ids, dtype=np.str_)}

    @classmethod
    def from_state(cls, options: dict[str, Any], arrays: dict[str, np.ndarray]) -> CollaborativeEncoder:
        return cls(**options, table=arrays["table"], table_ids=arrays["table_ids"].tolist())
