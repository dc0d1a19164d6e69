"""Item encoders: item dicts -> float32 vectors, behind one small ABC and a name registry.

Why pluggable: the semantic ID is only as good as the item embedding it quantizes. Text (the "LLM prior")
works for brand-new items, structured fields add what text misses, and collaborative embeddings from a
trained model add behaviour once there is some. Image / video / audio encoders plug in the same way:
subclass :class:`ItemEncoder`, decorate with ``@register_encoder("image")``, name it in the config.

Every encoder can be saved as ``(options: JSON dict, arrays: dict[str, np.ndarray])`` and rebuilt from that
with no training code, so the artifact that a Flink worker loads encodes new items exactly like the builder
did. Heavy libraries (sentence-transformers, transformers, torch) are imported only when a backend needs them.

This module is the contract and the registry; the built-in kinds live beside it: text (encoders_text),
structured and collaborative (encoders_structured), and the fusion of parts (encoders_fusion, which imports
the others, so every built-in kind is registered wherever a fused encoder is built or loaded).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from models.semantic_ids.items import canonical_item


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


def check_batch(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Canonical item dicts; a single item passed where a batch is expected is an error, not N characters."""
    if isinstance(items, Mapping) or isinstance(items, str):
        raise EncoderError("encode takes a list of item dicts, not a single item")
    return [canonical_item(it) for it in items]


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
