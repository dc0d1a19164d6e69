"""bench/cold_start.py: the headline keys issue #22 asks for, the content-kNN anchor's vectors, and (slow) the
CPU-size run on ML-100K with the freshness variant."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import cold_start
from bench.cold_anchors import content_vectors
from models.data import build_sequences
from tests.models.conftest import random_dataset


def row(run: str, cold: float, cold200: float, warm: float) -> dict:
    return {"run": run, "test": {"hr@10": 0.0}, "test_cold": {"hr@10": cold, "hr@200": cold200},
            "test_warm": {"hr@10": warm}}


def test_headline_keys_compare_the_variant_with_the_same_model_without_it(tmp_path):
    users = tmp_path / "new_users.json"
    users.write_text(json.dumps({"commit": "abc1234", "new_user_hr@10_after_5": 0.34,
                                 "popularity_new_user_hr@10_after_5": 0.17, "unrelated": 1}))
    rows = [row("trained_on_all", 0.39, 0.85, 0.32), row("new_items", 0.02, 0.37, 0.3215),
            row("new_items+freshness", 0.16, 0.72, 0.3200), row("popularity", 0.0, 0.0, 0.1),
            row("content_knn", 0.01, 0.2, 0.01)]
    top = cold_start.headline(rows, "new_items+freshness", users)
    assert top["cold_item_hr@10"] == 0.16 and top["cold_item_hr@200"] == 0.72 and top["warm_hr@10"] == 0.32
    assert top["warm_hr@10_loss"] == 0.0015  # new_items' warm HR@10 minus the variant's
    assert top["retrained_cold_item_hr@10"] == 0.39 and top["popularity_cold_item_hr@10"] == 0.0
    assert top["content_knn_cold_item_hr@200"] == 0.2 and top["without_change_cold_item_hr@10"] == 0.02
    assert top["new_user_hr@10_after_5"] == 0.34 and "unrelated" not in top and "abc1234" in top["new_users_from"]
    assert "new_user_hr@10_after_5" not in cold_start.headline(rows, "new_items", tmp_path / "absent.json")


def test_known_variants_expand_and_unknown_bare_names_are_refused():
    args = cold_start.parse_args(["--variants", "freshness", "--id-dropout", ""])
    runs = {r["name"]: r["sets"] for r in cold_start.plan(args)}
    assert "model_config.freshness.enabled=true" in runs["new_items+freshness"]
    assert list(runs) == ["trained_on_all", "new_items", "new_items+freshness"]
    with pytest.raises(SystemExit, match="no overrides"):
        cold_start.plan(cold_start.parse_args(["--variants", "nonsense"]))


def test_content_vectors_are_unit_rows_of_genres_decade_and_codes():
    data = build_sequences(random_dataset(users=5, items=12, events=6), "stable")
    codes = np.zeros((13, 2), np.int64)
    codes[1:] = np.stack([np.arange(12) % 3, np.arange(12) % 2], 1)
    vectors = content_vectors(data, codes)
    assert np.allclose(np.linalg.norm(vectors[1:], axis=1), 1.0) and not vectors[0].any()
    same = [i for i in range(2, 13) if (codes[i] == codes[1]).all() and data.item_year_bucket[i] ==
            data.item_year_bucket[1] and set(data.item_genres[i]) == set(data.item_genres[1])]
    for i in same:  # identical content, identical vector
        assert np.allclose(vectors[i], vectors[1])


@pytest.mark.slow
def test_cpu_size_run_on_ml100k_writes_the_headline_keys(tmp_path):
    out = tmp_path / "cold_start.json"
    argv = ["--config", "models/configs/ugt_ml100k_tiny.yaml", "--cold", "{year_from: 1997}", "--id-dropout", "",
            "--variants", "freshness", "--parallel", "3", "--set", "max_epochs=1", "--set", "max_users=300",
            "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--new-users", str(tmp_path / "none.json")]
    assert cold_start.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "cold_start" and result["headline_run"] == "new_items+freshness"
    runs = [r["run"] for r in result["rows"]]
    assert runs == ["trained_on_all", "new_items", "new_items+freshness", "popularity", "content_knn"]
    for key in ("cold_item_hr@10", "cold_item_hr@200", "warm_hr@10", "warm_hr@10_loss",
                "retrained_cold_item_hr@10", "content_knn_cold_item_hr@10", "popularity_cold_item_hr@10"):
        assert key in result, key
    assert 0.0 <= result["cold_item_hr@10"] <= result["cold_item_hr@200"] <= 1.0
    assert result["popularity_cold_item_hr@200"] == 0.0  # new items have no training events


def test_content_knn_search_is_the_same_exact_search_without_faiss(monkeypatch):
    from bench.cold_anchors import exact_search

    rows = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)  # unit rows: each is its own nearest
    scores, found, engine = exact_search(rows, rows[:4], 5)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # as on a machine without faiss
    np_scores, np_found, np_engine = exact_search(rows, rows[:4], 5)
    assert (engine, np_engine) == ("faiss", "numpy") and (found == np_found).all()
    assert np.allclose(scores, np_scores, atol=1e-5) and (found[:, 0] == np.arange(4)).all()


def test_the_headline_row_is_chosen_on_validation_within_the_warm_budget():
    def held(run: str, cold: float, warm: float) -> dict:
        return {"run": run, "valid_cold": {"hr@10": cold, "hr@200": 0.5}, "valid_warm": {"hr@10": warm},
                "test_cold": {"hr@10": 0.9}}  # test numbers never take part

    rows = [held("new_items", 0.01, 0.160), held("new_items+stream_k8_c0.6", 0.12, 0.140),
            held("new_items+stream_k32_c0.7", 0.05, 0.157), held("new_items+freshness", 0.03, 0.158),
            {"run": "trained_on_all", "valid_cold": {"hr@10": 0.3, "hr@200": 0.9}, "valid_warm": {"hr@10": 0.2}}]
    assert cold_start.pick_on_valid(rows) == "new_items+stream_k32_c0.7"  # best cold among losses <= 0.005
    assert cold_start.pick_on_valid(rows[:2]) == "new_items"  # the other loses 0.02: the least loss wins
    assert cold_start.pick_on_valid(rows[1:]) == ""  # no new_items row to measure the loss against


def test_a_held_out_run_stores_its_mean_state_and_gets_stream_rows_on_valid_and_test(tmp_path):
    from bench.cold_stream import stream_rows
    from models.checkpoint import load_checkpoint
    from models.train import fit
    from models.train_config import load_config

    cfg = load_config("models/configs/ugt_ml100k_tiny.yaml", {
        "out_dir": str(tmp_path), "progress": False, "device": "cpu", "max_epochs": 1, "max_users": 200,
        "model_config.embedding.stream_k": 64.0, "cold_items": {"year_from": 1997}})
    summary = fit(cfg)
    assert summary["valid_cold"]["users"] + summary["valid_warm"]["users"] == summary["valid"]["users"]
    model = load_checkpoint(tmp_path / "checkpoint.pt")[0]
    assert model.embed.stream_mean.abs().sum() > 0  # what serving centers the live items' sums on
    rows = stream_rows(tmp_path, "new_items", [(64.0, 0.7, 1.0), (1e12, 0.7, 1.0), (64.0, 0.7, 0.5),
                                               (64.0, 0.0, 1.0, 0.5), (1e12, 0.0, 1.0, 0.5)])
    assert [r["run"] for r in rows] == ["new_items+stream_k64_c0.7", "new_items+stream_k1e+12_c0.7",
                                        "new_items+stream_k64_c0.7_s0.5", "new_items+stream_k64_c0_b0.5",
                                        "new_items+stream_k1e+12_c0_b0.5"]
    assert rows[3]["stream_background"] == 0.5 and rows[3]["test_cold"]["users"] == rows[0]["test_cold"]["users"]
    # the background moves the new items' rows; with K past any event count the content rows come back regardless
    assert rows[3]["test_cold"] != rows[0]["test_cold"]
    assert rows[4]["test_cold"]["hr@200"] == pytest.approx(summary["test_cold"]["hr@200"], abs=1e-4)
    assert rows[2]["stream_scale"] == 0.5 and rows[2]["test_cold"]["users"] == rows[0]["test_cold"]["users"]
    for part in ("test", "test_cold", "test_warm", "valid_cold", "valid_warm"):
        assert rows[0][part]["users"] == summary[part]["users"]
    # with K past any event count the stream weighs nothing: the run's own scores come back
    assert rows[1]["test_cold"]["hr@200"] == pytest.approx(summary["test_cold"]["hr@200"], abs=1e-4)
    assert rows[1]["valid_warm"]["hr@10"] == pytest.approx(summary["valid_warm"]["hr@10"], abs=1e-4)
