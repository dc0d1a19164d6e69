"""The cold-start protocol (models.data.cold_item_mask / without_items, TrainConfig.cold_items) and ID dropout.

New items are held out of training entirely and scored at test time the way the serving live catalog scores items
coded after training: by semantic ID and metadata, with no ID row. bench/cold_start.py runs it on ML-1M.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.checkpoint import load_data
from models.data import build_sequences, cold_item_mask, make_split, without_items
from models.train import cold_holdout, fit, make_splits
from models.train_config import load_config
from models.ugt.embedding import EmbeddingConfig, UnifiedEmbedding
from tests.models.conftest import random_dataset


def test_held_out_items_never_reach_training_and_eval_rows_are_unchanged():
    data = build_sequences(random_dataset(users=20, items=40, events=18), "stable")
    cold = cold_item_mask(data, {"fraction": 0.2, "seed": 1})
    assert cold.sum() == 8 and not cold[0]
    train = make_split(without_items(data, cold), "train", 10, 8, all_windows=True)
    for held in (train.ids, train.targets, train.long_ids):  # row 0 (padding) is never cold
        assert len(held[held > 0]) and not cold[held].any()
    # a training row's events come from before the full data's validation target: nothing leaks
    for u in range(data.num_users):
        full_train = set(data.items[u][:-2].tolist())
        kept = without_items(data, cold).items[u][:-2]
        assert set(kept.tolist()) <= full_train
    for split in ("valid", "test"):
        a, b = make_split(data, split, 10, 8), make_split(data, split, 10, 8)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.targets, b.targets)
    by_year = cold_item_mask(data, {"year_from": 2005})
    assert np.array_equal(by_year, data.item_release_year >= 2005) and by_year.any()
    with pytest.raises(ValueError, match="selects no item"):
        cold_item_mask(data, {"year_from": 3000})


def test_id_dropout_embeds_items_by_semantic_id_and_metadata_only_while_training():
    rng = np.random.default_rng(0)
    codes = np.zeros((11, 2), np.int64)
    codes[1:] = np.stack([np.arange(10) % 3, np.arange(10) // 3], 1)
    emb = UnifiedEmbedding(16, 10, 8, EmbeddingConfig(item_repr="id+sid", id_dropout=1.0),
                           rng.integers(0, 3, (11, 2)), rng.integers(0, 4, 11), codes, [3, 4])
    ids = torch.arange(1, 11)
    with torch.no_grad():
        emb.train()
        dropped = emb.item_vectors(ids)
        torch.testing.assert_close(dropped, emb.sid_vectors(ids) + emb.feature_vectors(ids))
        emb.eval()
        full = emb.item_vectors(ids)
        torch.testing.assert_close(full, emb.item_emb(ids) + emb.sid_vectors(ids) + emb.feature_vectors(ids))


def test_a_new_item_quota_keeps_the_best_new_items_in_the_top_list():
    from models.eval import _quota_positions

    scores = torch.tensor([[0.0, 9, 8, 7, 6, 5, 1, 0.5]])  # items 1..7; 6 and 7 are new, 3 is masked
    invalid = torch.zeros(1, 8, dtype=torch.bool)
    invalid[0, [0, 3]] = True
    new = torch.zeros(8, dtype=torch.bool)
    new[[6, 7]] = True
    at = {t: int(_quota_positions(scores, invalid, torch.tensor([t]), new, 3, 1)) for t in range(1, 8)}
    assert at == {1: 1, 2: 2, 3: 0, 4: 0, 5: 0, 6: 3, 7: 0}  # list: 1, 2, then the best new item 6
    two = {t: int(_quota_positions(scores, invalid, torch.tensor([t]), new, 3, 2)) for t in (1, 2, 6, 7)}
    assert two == {1: 1, 2: 0, 6: 2, 7: 3}


def test_the_content_tower_stands_in_for_a_missing_id_row():
    rng = np.random.default_rng(1)
    codes = np.zeros((11, 2), np.int64)
    codes[1:] = np.stack([np.arange(10) % 3, np.arange(10) // 3], 1)
    emb = UnifiedEmbedding(16, 10, 8, EmbeddingConfig(item_repr="id+sid", content_tower=True, id_dropout=1.0),
                           rng.integers(0, 3, (11, 2)), rng.integers(0, 4, 11), codes, [3, 4]).eval()
    ids = torch.arange(1, 11)
    with torch.no_grad():
        emb.has_id[3] = False  # item 3 arrived after training
        content = emb.sid_vectors(ids) + emb.feature_vectors(ids)
        got = emb.item_vectors(ids)
        want = emb.item_emb(ids) + content
        want[2] = emb.content_tower(content[2]) + content[2]
        torch.testing.assert_close(got, want)
        emb.train()  # id_dropout 1.0: every occurrence uses the tower
        torch.testing.assert_close(emb.item_vectors(ids), emb.content_tower(content) + content)
        emb.reserve(2)  # serving: reserved rows have no ID row either
        assert emb.has_id.tolist()[-3:] == [True, False, False]


@pytest.fixture(scope="module")
def sid_npz(tmp_path_factory):
    """Synthetic semantic IDs for every ML-100K item: unique (l1, l2, dedup)."""
    from contracts.datasets import load_dataset

    out = tmp_path_factory.mktemp("cold")
    items = [str(i) for i in load_dataset("ml-100k").items["item_id"]]
    order = np.random.default_rng(0).permutation(len(items))
    codes = np.stack([order % 8, (order // 8) % 8, order // 64], 1)
    np.savez(out / "sid.npz", codes=codes, item_ids=np.asarray(items), codebook_sizes=np.asarray([8, 8, 64]))
    return out / "sid.npz"


def test_fit_with_a_cold_holdout_keeps_new_items_id_less_and_reports_them_apart(sid_npz, tmp_path):
    cfg = load_config("models/configs/ugt_ml100k_tiny.yaml", {
        "out_dir": str(tmp_path), "progress": False, "device": "cpu", "max_epochs": 1, "max_users": 300,
        "model_config.embedding.item_repr": "id+sid", "model_config.embedding.id_dropout": 0.2,
        "model_config.heads.semantic_id": True, "semantic_ids": {"artifact": str(sid_npz)},
        "cold_items": {"fraction": 0.1, "seed": 3}})
    summary = fit(cfg)
    assert summary["cold_items"]["holdout"] and summary["cold_items"]["id_rows_zero"]
    assert summary["test_cold"]["users"] + summary["test_warm"]["users"] == summary["test"]["users"]
    assert summary["test_cold"]["users"] > 0
    one = summary["test_quota"]["1_of_10"]
    assert one["hr@10"] >= 0 and summary["test_cold"]["new_item_quota"]["1_of_10"]["hr@10"] >= \
        summary["test_cold"]["hr@10"]  # a slot kept for new items never loses a new-item target
    data = load_data(cfg)
    cold, holdout = cold_holdout(cfg, data)
    train = make_splits(cfg, data, cold)["train"]
    assert holdout and not cold[train.targets[train.targets > 0]].any()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["test_cold"]["hr@10"] == summary["test_cold"]["hr@10"]
    bad = load_config("models/configs/ugt_ml100k_tiny.yaml", {"cold_items": {"fraction": 0.1},
                                                               "model": "sasrec"})
    with pytest.raises(ValueError, match="needs model: ugt"):
        cold_holdout(bad, data)
