"""The GPU generator benchmark's workloads (bench/serving_gpu.py): the models it serves and their request pools.

The industrial size (8 layers, d = 256, history 1,024, 1M items, random weights, random full histories) and the
trained ML-1M UGT (a checkpoint from `ugt train`, or one trained here first) with its test rows and targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import history_row
from models.ugt.model import UGT, UGTConfig

REPO = Path(__file__).resolve().parent.parent


def industrial_codes(items: int, seed: int = 0) -> np.ndarray:
    """Random distinct semantic IDs (3 x 256) for ``items`` items; row 0 the padding item."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(256**3, size=items, replace=False)
    codes = np.zeros((items + 1, 3), np.int64)
    codes[1:] = np.stack([flat // 65536, (flat // 256) % 256, flat % 256], 1)
    return codes


def industrial_model(items: int, history: int, seed: int = 0, layers: int = 8, dim: int = 256) -> UGT:
    """8 layers, d = 256, 4 heads x 64, MoE 4 x 256 top-2 (computed densely: a 1,024-wide FFN's cost),
    history ``history`` (one token per event), ``items`` items, random semantic IDs (3 x 256) + SID head;
    ``layers`` and ``dim`` (heads of 64: dim / 64 of them, MoE experts dim wide) scale it."""
    torch.manual_seed(seed)
    codes = industrial_codes(items, seed)
    cfg = UGTConfig.from_dict({
        "num_items": items, "d_model": dim, "num_layers": layers, "num_heads": max(1, dim // 64), "dqk": 64, "dv": 64,
        "dropout": 0.0,
        "embedding": {"item_repr": "id", "use_genres": False, "use_year": False},
        "multiscale": {"recent_len": history, "long_groups": 0},
        "moe": {"d_ff": dim, "num_experts": 4, "top_k": 2}, "heads": {"semantic_id": True, "ranking": True},
    })
    return UGT(cfg, None, None, codes, [256, 256, 256]).eval()


def industrial_pool(users: int, history: int, items: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Full-length random histories (every position real), request time one hour after the last event."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(users):
        ids = rng.integers(1, items + 1, size=history)
        times = 1_700_000_000 + np.cumsum(rng.integers(1, 20_000, size=history))
        ratings = rng.integers(0, 11, size=history)
        rows.append(history_row(ids, times, ratings, history, 0, int(times[-1]) + 3600))
    return rows


def train_ml1m(minutes: float, out_dir: str) -> Path:
    """A short `ugt train` of models/configs/ugt_ml1m.yaml (DPO off; semantic IDs from .ugtdata when there)."""
    from models.train import fit
    from models.train_config import load_config

    sets: dict[str, Any] = {"out_dir": out_dir, "max_minutes": minutes, "progress": False, "dpo": {"enabled": False}}
    artifact = REPO / ".ugtdata" / "sid" / "ml1m"
    if artifact.exists():
        sets["semantic_ids"] = {"artifact": str(artifact)}
    fit(load_config(str(REPO / "models/configs/ugt_ml1m.yaml"), sets))
    return Path(out_dir) / "checkpoint.pt"


def ml1m_pool(checkpoint: Path) -> dict[str, Any]:
    """The trained model, its test rows (one per user, as eval builds them) and their targets."""
    from models.checkpoint import load_checkpoint, long_history_len
    from models.data import make_split

    model, cfg, data, _ = load_checkpoint(checkpoint)
    split = make_split(data, "test", cfg.max_len, long_history_len(cfg))
    R = len(split.users)
    batched = split.rows(np.arange(R))
    keys = ("ids", "times", "query_times", "ratings", "gaps", "query_gaps", "lengths", "long_ids", "long_times")
    rows = [{k: batched[k][r : r + 1] for k in keys} for r in range(R)]
    summary_path = checkpoint.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"model": model.eval(), "rows": rows, "targets": np.asarray(batched["targets"]), "summary": summary,
            "mask": cfg.mask_history}
