"""Training loop mechanics on synthetic data: configs, checkpoints with config + vocab, resume, DPO pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import build_sequences, make_split
from models.dpo import preference_pairs
from models.train import fit
from models.train_config import DPOConfig, TrainConfig, load_config
from tests.models.conftest import random_dataset


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(name="t", model="hstu", max_len=8, batch_size=4, max_epochs=2, patience=5, progress=False,
                device="cpu", out_dir=str(tmp_path), model_config={"embedding_dim": 8, "dqk": 8, "dv": 8},
                eval_batch_size=8)
    base.update(kw)
    return TrainConfig(**base)


def test_checkpoint_holds_config_and_vocab_and_resume_continues(tmp_path):
    data = build_sequences(random_dataset(), "stable")
    first = fit(_cfg(tmp_path), data=data)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["model"] == "hstu" and ckpt["vocab"] == data.vocab.item_to_index
    assert ckpt["model_config"]["embedding_dim"] == 8 and ckpt["train_state"]["epoch"] >= 1
    resumed = fit(_cfg(tmp_path, max_epochs=4), resume=tmp_path / "checkpoint.pt", data=data)
    assert resumed["epochs_run"] == 4 and first["epochs_run"] == 2
    assert (tmp_path / "log.jsonl").read_text().count("\n") >= 4


def test_config_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: sasrec\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(bad)
    with pytest.raises(ValueError):
        TrainConfig(model="bert4rec")
    good = tmp_path / "good.yaml"
    good.write_text("model: sasrec\nmodel_config: {embedding_dim: 8}\n")
    cfg = load_config(good, {"model_config.embedding_dim": 16, "max_len": 20})
    assert cfg.model_config["embedding_dim"] == 16 and cfg.max_len == 20


def test_preference_pairs_follow_the_rule():
    data = build_sequences(random_dataset(users=6, events=30), "stable")
    split = make_split(data, "train", max_len=28)
    rule = DPOConfig(window=4, high=8, low=4, max_pairs_per_row=100)
    pairs = preference_pairs(split, rule, np.random.default_rng(0))
    assert (pairs["pos"] >= 0).sum() > 0
    for r in range(len(split)):
        for pos, chosen, rejected in zip(pairs["pos"][r], pairs["chosen"][r], pairs["rejected"][r], strict=True):
            if pos < 0:
                continue
            window = slice(pos, pos + rule.window)
            targets, ratings = split.targets[r, window], split.target_ratings[r, window]
            assert ratings[list(targets).index(chosen)] >= rule.high
            assert 0 < ratings[list(targets).index(rejected)] <= rule.low
