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


def test_deadline_stop_and_resume_from_last_match_an_uninterrupted_run(tmp_path, monkeypatch):
    """UGT_TRAIN_DEADLINE stops a run after an epoch with last.pt saved and no summary.json; resuming it in new
    fit() calls (as new processes would) restores weights, optimizer, best state and RNGs, so the result equals one
    run that never stopped, and the finished run drops its last.pt."""
    data = build_sequences(random_dataset(users=16, events=20), "stable")
    kw = dict(max_epochs=4, max_len=12, model_config={"embedding_dim": 8, "dqk": 8, "dv": 8, "dropout": 0.3})
    whole = fit(_cfg(tmp_path / "whole", **kw), data=data)
    monkeypatch.setenv("UGT_TRAIN_DEADLINE", "1")  # long past: stop after every epoch
    parts = tmp_path / "parts"
    summary, calls = fit(_cfg(parts, **kw), data=data), 1
    assert summary["interrupted"] == "deadline after epoch 1"
    assert (parts / "last.pt").exists() and not (parts / "summary.json").exists()
    while summary.get("interrupted"):
        summary, calls = fit(_cfg(parts, **kw), resume=parts / "last.pt", data=data), calls + 1
    assert calls == 4 and summary["epochs_run"] == whole["epochs_run"] == 4
    assert summary["best_epoch"] == whole["best_epoch"]
    assert summary["test"]["ndcg@10"] == pytest.approx(whole["test"]["ndcg@10"], abs=1e-9)
    assert summary["test"]["mrr"] == pytest.approx(whole["test"]["mrr"], abs=1e-9)
    assert not (parts / "last.pt").exists() and (parts / "summary.json").exists()


def test_a_deadline_that_is_not_a_number_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("UGT_TRAIN_DEADLINE", "tomorrow")
    with pytest.raises(ValueError, match="UGT_TRAIN_DEADLINE"):
        fit(_cfg(tmp_path), data=build_sequences(random_dataset(), "stable"))
