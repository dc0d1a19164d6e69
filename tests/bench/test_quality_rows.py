"""The quality bench's row matrix: every row a valid config, every UGT switch real (a tiny CPU run each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from bench.quality_rows import ABLATIONS, REPO, SEEDS, STRONGEST_BASELINE, matrix, row_config, select
from models.data import build_sequences
from models.train import fit
from models.train_config import load_config
from tests.models.conftest import random_dataset


def test_the_matrix_covers_the_issue() -> None:
    rows = matrix(".ugtdata/sid/ml1m")
    names = [r.name for r in rows]
    assert len(names) == len(set(names))
    for ties in ("stable", "hstu"):
        for model in ("sasrec", "hstu", "hstu_large"):
            assert {r.recipe for r in rows if r.model == model and r.tie_order == ties} == {"paper", "ugt"}
        ugt = [r for r in rows if r.model == "ugt" and not r.variant and r.tie_order == ties]
        assert sorted(r.seed for r in ugt) == list(SEEDS)
        best = [r for r in rows if (r.model, r.recipe) == STRONGEST_BASELINE and r.tie_order == ties]
        assert sorted(r.seed for r in best) == list(SEEDS)
    dpo = sorted(r.seed for r in rows if r.variant == "dpo")
    assert dpo == sorted(r.seed for r in rows if r.model == "ugt" and not r.variant and r.tie_order == "stable")
    assert {r.variant for r in rows if r.variant} == set(ABLATIONS)


def test_each_recipe_is_what_it_says() -> None:
    rows = {r.name: r for r in matrix(".ugtdata/sid/ml1m")}
    ugt = row_config(rows["ugt-stable-s42"])
    paper, fair = row_config(rows["hstu_large-paper-stable-s42"]), row_config(rows["hstu_large-ugt-stable-s42"])
    assert (paper["num_negatives"], paper["train_windows"]) == (128, "last")
    assert (fair["num_negatives"], fair["train_windows"]) == (0, "all")
    assert (fair["max_epochs"], fair["patience"]) == (ugt["max_epochs"], ugt["patience"])
    assert not ugt["dpo"] and row_config(rows["ugt+dpo-stable-s42"])["dpo"]
    assert row_config(rows["ugt-hstu-s43"]) == ugt  # tie order and seed are not in this view; the rest is equal


def test_select_by_name_prefix_and_file(tmp_path) -> None:
    rows = matrix(".ugtdata/sid/ml1m")
    assert {r.variant for r in select(rows, "ugt+")} == set(ABLATIONS)
    listing = tmp_path / "rows.txt"
    listing.write_text("# first call\nsasrec-paper-stable-s42\npopularity\n")
    assert [r.name for r in select(rows, rows_from=str(listing))] == [
        "sasrec-paper-stable-s42", "popularity-stable-s42", "popularity-hstu-s42"]
    with pytest.raises(SystemExit, match="no row matches"):
        select(rows, "bert4rec")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Synthetic data and a semantic-ID artifact (.npz) for its items."""
    data = build_sequences(random_dataset(users=10, items=30, events=14), "stable")
    path = tmp_path_factory.mktemp("sid") / "codes.npz"
    rng = np.random.default_rng(0)
    item_ids = list(data.vocab.item_to_index)
    np.savez(path, codes=rng.integers(0, 8, size=(len(item_ids), 3)), item_ids=np.array(item_ids),
             codebook_sizes=np.array([8, 8, 8]))
    return data, path


@pytest.mark.parametrize("variant", ["", *ABLATIONS])
def test_every_ugt_switch_trains(variant, synthetic, tmp_path) -> None:
    """The UGT row and each ablation, shrunk, train an epoch on CPU; the switch reaches the built model."""
    data, sid = synthetic
    row = next(r for r in matrix(str(sid)) if r.model == "ugt" and r.variant == variant and r.tie_order == "stable")
    values = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in row.sets)}  # as `ugt train --set`
    values.update({"model_config.d_model": 16, "model_config.num_layers": 1, "model_config.dqk": 8,
                   "model_config.dv": 8, "model_config.multiscale.max_long": 8, "model_config.heads.beam_size": 5,
                   "max_len": 8, "max_epochs": 1, "batch_size": 8, "eval_batch_size": 16, "device": "cpu",
                   "progress": False, "out_dir": str(tmp_path), "dpo.epochs": 1})
    cfg = load_config(REPO / row.config, values)
    summary = fit(cfg, data=data)
    mc = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model_config"]
    expected = {"": lambda: mc["embedding"]["item_repr"] == "id+sid" and mc["heads"]["semantic_id"],
                "no_sid": lambda: mc["embedding"]["item_repr"] == "id" and not mc["heads"]["semantic_id"],
                "no_side": lambda: not any(mc["embedding"][k] for k in ("use_rating", "use_genres", "use_year")),
                "no_long": lambda: mc["multiscale"]["long_groups"] == 0,
                "dense_ffn": lambda: mc["moe"]["dense"],
                "layernorm": lambda: not mc["gln"]["grouped"],
                "dpo": lambda: "dpo" in summary}
    assert expected[variant](), mc
    assert summary["epochs_run"] >= 1 and 0 <= summary["test"]["ndcg@10"] <= 1
