"""Shared serving fixtures: a tiny UGT trained once per test module (one epoch, 400 ML-100K users, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CONFIG = "models/configs/ugt_ml100k_tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from models.train import fit
    from models.train_config import load_config

    out = tmp_path_factory.mktemp("ugt")
    cfg = load_config(TINY_CONFIG, {"out_dir": str(out), "progress": False, "device": "cpu", "max_epochs": 1,
                                    "max_users": 400})
    fit(cfg)
    return out / "checkpoint.pt"
