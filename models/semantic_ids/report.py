"""Semantic-ID quality report: codebook use per level, collisions before dedup, reconstruction error.

Same fields for every quantizer (RQ-VAE, RQ-k-means), so the two sit side by side in one JSON and one PNG.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.semantic_ids.codebooks import ResidualQuantizer, codebook_usage, relative_errors
from models.semantic_ids.dedup import collision_stats

QUANTIZER_FIELDS = ("codebook_usage", "collisions", "reconstruction", "train_seconds")


def quantizer_report(quantizer: ResidualQuantizer, x: np.ndarray, prefixes: np.ndarray, train_seconds: float) -> dict:
    """Fields of one quantizer on the catalog's fused vectors ``x`` and its ``[N, L]`` codes."""
    return {
        "codebook_sizes": quantizer.codebook_sizes,
        "codebook_usage": codebook_usage(prefixes, quantizer.codebook_sizes),
        "collisions": collision_stats(prefixes),
        # relative squared error after 1..L levels: latent space, and the fused item vector
        "reconstruction": relative_errors(quantizer, x, prefixes),
        "train_seconds": float(train_seconds),
    }


def artifact_summary(codes: np.ndarray, codebook_sizes: Sequence[int]) -> dict[str, Any]:
    """What can be recomputed from an artifact's table alone (used by `ugt semantic-ids report`)."""
    prefixes = codes[:, :-1]
    unique_full = len(np.unique(codes, axis=0))
    return {
        "items": int(len(codes)),
        "codebook_usage": codebook_usage(prefixes, list(codebook_sizes)[:-1]),
        "collisions_before_dedup": collision_stats(prefixes),
        "unique_after_dedup": bool(unique_full == len(codes)),
        "dedup_index_max": int(codes[:, -1].max()) if len(codes) else 0,
        "dedup_size": int(codebook_sizes[-1]),
    }


def write_report(report: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.png`` (codebook use, collisions, reconstruction error per method)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=_default) + "\n")
    png_path = folder / "report.png"
    plot_report(report, png_path)
    return json_path, png_path


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report.get("quantizers", {})
    if not methods:
        raise ValueError("report has no 'quantizers' section to plot")
    names = list(methods)
    levels = max(len(m["codebook_usage"]) for m in methods.values())
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for j, name in enumerate(names):
        usage = methods[name]["codebook_usage"]
        # perplexity / size: 1.0 = every code equally used; "used" alone hides a level where one code takes most items
        effective = [u["perplexity"] / u["size"] for u in usage]
        bars = ax.bar(np.arange(len(usage)) + j * width, effective, width, label=name)
        ax.bar_label(bars, labels=[f"{u['used']} used" for u in usage], fontsize=7)
    ax.set_xticks(np.arange(levels) + width * (len(names) - 1) / 2, [f"L{i + 1}" for i in range(levels)])
    ax.set_ylim(0, 1.1)
    ax.set_title("codebook use per level: perplexity / size (labels: codes used)", fontsize=10)
    ax.legend()
    ax = axes[1]
    rates = [methods[n]["collisions"]["collision_rate"] for n in names]
    bars = ax.bar(names, rates, color=["C0", "C1", "C2", "C3"][: len(names)])
    ax.bar_label(bars, labels=[f"{r:.3f}" for r in rates])
    ax.set_title("collision rate before dedup (items needing dedup > 0)", fontsize=10)
    ax = axes[2]
    for j, name in enumerate(names):
        err = methods[name]["reconstruction"]["input"]
        ax.bar(np.arange(len(err)) + j * width, err, width, label=name)
    ax.set_xticks(np.arange(levels) + width * (len(names) - 1) / 2, [f"{i + 1} lvl" for i in range(levels)])
    ax.set_title("relative reconstruction error of the fused item vector", fontsize=10)
    ax.legend()
    title = f"semantic IDs: {report.get('dataset') or ''} {report.get('items', '')} items, chosen = {report.get('chosen')}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(report: dict[str, Any]) -> str:
    """A few readable lines for the terminal."""
    lines = [f"items: {report.get('items')}  chosen: {report.get('chosen')}  codebook sizes: {report.get('codebook_sizes')}"]
    for name, m in report.get("quantizers", {}).items():
        use = " ".join(f"L{u['level'] + 1}={u['used']}/{u['size']} (ppl {u['perplexity']:.0f})" for u in m["codebook_usage"])
        err = " ".join(f"{e:.3f}" for e in m["reconstruction"]["input"])
        c = m["collisions"]
        lines.append(
            f"  {name:9s} use {use} | collision rate {c['collision_rate']:.4f} (max {c['max_items_per_prefix']}/prefix)"
            f" | recon err by levels {err} | fit {m['train_seconds']:.1f}s"
        )
    enc = report.get("encoders", {})
    for part in enc.get("parts", []):
        speed = part.get("items_per_s")
        speed_text = f"{speed:.0f} items/s" if speed else "cached"
        lines.append(f"  encoder {part['type']:10s} dim {part['dim']:4d}  {speed_text}")
    if "encode_new_items_per_s" in report:
        lines.append(f"  encode() of new items, end to end: {report['encode_new_items_per_s']:.0f} items/s")
    if "build_seconds" in report:
        lines.append(f"  build time: {report['build_seconds']:.1f}s")
    return "\n".join(lines)


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
