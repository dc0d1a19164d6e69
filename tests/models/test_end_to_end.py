"""A small real training run on ML-100K (CPU) that must beat popularity, then `ugt eval` on its checkpoint."""

from __future__ import annotations

import argparse
import json

import pytest

from models import eval_cli
from models.train import fit
from models.train_config import TrainConfig, load_config

CONFIG = "models/configs/ugt_ml100k_tiny.yaml"


@pytest.mark.slow
def test_tiny_ugt_on_ml100k_beats_popularity(tmp_path):
    cfg = load_config(CONFIG, {"out_dir": str(tmp_path / "ugt"), "progress": False, "device": "cpu"})
    summary = fit(cfg)
    pop = fit(TrainConfig(name="pop", dataset="ml-100k", tie_order="stable", model="popularity", max_len=50,
                          out_dir=str(tmp_path / "pop"), device="cpu"))
    ugt, base = summary["test"], pop["test"]
    assert ugt["users"] == base["users"] == 943
    assert ugt["hr@10"] > 1.5 * base["hr@10"], (ugt["hr@10"], base["hr@10"])
    assert ugt["ndcg@10"] > 1.5 * base["ndcg@10"], (ugt["ndcg@10"], base["ndcg@10"])
    assert (tmp_path / "ugt" / "checkpoint.pt").exists() and (tmp_path / "ugt" / "curves.png").exists()

    # `ugt eval` rebuilds the model from the checkpoint alone and reproduces the test numbers.
    out = tmp_path / "report"
    args = argparse.Namespace(checkpoint=str(tmp_path / "ugt" / "checkpoint.pt"), split="test", mask_history="window",
                              top_k=10, beam_size=20, no_popularity=False, out=str(out), device="cpu")
    assert eval_cli.run(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["hr@10"] == pytest.approx(ugt["hr@10"], abs=1e-6)
    assert report["rows"][-1]["model"] == "popularity"
    assert (out / "report.md").exists() and (out / "report.png").exists()
