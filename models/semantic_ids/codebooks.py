"""Numpy residual quantization: what a serving process or Flink worker runs (no torch import).

Both quantizers (RQ-VAE and RQ-k-means) end up as the same thing: an optional MLP encoder into a latent
space plus L codebooks; an item's code at level l is the nearest codeword to what levels < l left over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def nearest_codeword(x: np.ndarray, codebook: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of the nearest row of ``codebook`` (K, d) for every row of ``x`` (N, d); ties -> lowest index."""
    c_sq = np.einsum("kd,kd->k", codebook, codebook)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk]
        # ||x||^2 is the same for every codeword, so argmin of ||c||^2 - 2 x.c is the nearest
        out[start : start + chunk] = np.argmin(c_sq[None, :] - 2.0 * xs @ codebook.T, axis=1)
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


@dataclass
class MLP:
    """Linear layers with SiLU between them (none after the last); weights as ``(out, in)`` like torch."""

    weights: list[np.ndarray] = field(default_factory=list)
    biases: list[np.ndarray] = field(default_factory=list)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, np.float32)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w.T + b
            if i < len(self.weights) - 1:
                h = silu(h)
        return h.astype(np.float32, copy=False)

    @property
    def in_dim(self) -> int | None:
        return int(self.weights[0].shape[1]) if self.weights else None

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"{prefix}.{i}.w"], out[f"{prefix}.{i}.b"] = w, b
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> MLP:
        n = sum(1 for k in arrays if k.startswith(prefix + ".") and k.endswith(".w"))
        return cls([arrays[f"{prefix}.{i}.w"] for i in range(n)], [arrays[f"{prefix}.{i}.b"] for i in range(n)])


@dataclass
class ResidualQuantizer:
    """Encoder MLP (identity when empty) -> L residual codebooks; decoder MLP only for reconstruction error."""

    codebooks: list[np.ndarray]
    encoder: MLP = field(default_factory=MLP)
    decoder: MLP = field(default_factory=MLP)

    @property
    def codebook_sizes(self) -> list[int]:
        return [int(c.shape[0]) for c in self.codebooks]

    def latent(self, x: np.ndarray) -> np.ndarray:
        return self.encoder(x) if self.encoder.weights else np.asarray(x, np.float32)

    def quantize_latent(self, z: np.ndarray) -> np.ndarray:
        """``[N, L]`` codes of latent vectors."""
        residual = np.array(z, np.float32, copy=True)
        codes = np.empty((len(z), len(self.codebooks)), np.int64)
        for level, book in enumerate(self.codebooks):
            codes[:, level] = nearest_codeword(residual, book)
            residual -= book[codes[:, level]]
        return codes

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return self.quantize_latent(self.latent(x))

    def decode_latent(self, codes: np.ndarray, levels: int | None = None) -> np.ndarray:
        """Sum of the first ``levels`` codewords (all by default)."""
        levels = len(self.codebooks) if levels is None else levels
        dim = self.codebooks[0].shape[1]
        out = np.zeros((len(codes), dim), np.float32)
        for level in range(levels):
            out += self.codebooks[level][codes[:, level]]
        return out

    def reconstruct(self, codes: np.ndarray, levels: int | None = None) -> np.ndarray:
        """Back to the input space: through the decoder when there is one."""
        zq = self.decode_latent(codes, levels)
        return self.decoder(zq) if self.decoder.weights else zq

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"codebook.{i}": c for i, c in enumerate(self.codebooks)}
        out.update(self.encoder.arrays("encoder"))
        out.update(self.decoder.arrays("decoder"))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ResidualQuantizer:
        n = sum(1 for k in arrays if k.startswith("codebook."))
        return cls(
            [arrays[f"codebook.{i}"] for i in range(n)],
            MLP.from_arrays(arrays, "encoder"),
            MLP.from_arrays(arrays, "decoder"),
        )


def relative_errors(quantizer: ResidualQuantizer, x: np.ndarray, codes: np.ndarray) -> dict[str, list[float]]:
    """Per number of levels used (1..L): relative squared error in the latent and in the input space.

    ``latent[l-1] = ||z - zq_l||^2 / ||z - mean z||^2`` (so 1.0 = no better than predicting the mean), and
    ``input[l-1]`` the same for the reconstruction of the fused item vector.
    """
    z = quantizer.latent(x)
    z_var = float(((z - z.mean(0)) ** 2).sum()) or 1.0
    x_var = float(((x - x.mean(0)) ** 2).sum()) or 1.0
    latent, inp = [], []
    for levels in range(1, len(quantizer.codebooks) + 1):
        latent.append(float(((z - quantizer.decode_latent(codes, levels)) ** 2).sum()) / z_var)
        inp.append(float(((x - quantizer.reconstruct(codes, levels)) ** 2).sum()) / x_var)
    return {"latent": latent, "input": inp}


def codebook_usage(codes: np.ndarray, sizes: Sequence[int]) -> list[dict[str, float]]:
    """Per level: codes used, their share of the codebook, and the perplexity of the code distribution."""
    out = []
    for level, size in enumerate(sizes):
        counts = np.bincount(codes[:, level], minlength=size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out.append(
            {
                "level": level,
                "size": int(size),
                "used": int((counts > 0).sum()),
                "used_fraction": float((counts > 0).sum() / size),
                "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                "max_items_per_code": int(counts.max()),
            }
        )
    return out
