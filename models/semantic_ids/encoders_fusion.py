"""The fused item encoder: parts (text, structured, collaborative, ...) centred, normalised, weighted, concatenated.

Imports the built-in kinds so that a fusion built from a config or loaded from an artifact finds them registered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import models.semantic_ids.encoders_structured  # noqa: F401 - registers "structured" and "collab"
import models.semantic_ids.encoders_text  # noqa: F401 - registers "text"
from models.semantic_ids.encoders import EncoderError, ItemEncoder, build_encoder, encoder_from_state


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
