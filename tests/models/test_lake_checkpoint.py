"""A model trained on the lake (`ugt train --lake`) must load for serving after the lake has grown."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.jobs.test_lake import DAY_MS, token, write_part

torch = pytest.importorskip("torch")


def write_events(lake: Path, users: int, per_user: int, first: int, items: int) -> int:
    rows, i = [], first
    t0 = 978_220_800_000
    for u in range(users):
        for n in range(per_user):
            i += 1
            t = token(i, f"u{u}", t0 + u * DAY_MS // 100 + n * 60_000)
            rows.append((replace(t, item_id=f"m{(u * 3 + n) % items}"), 0, i))
    write_part(lake, "2000-12-31", rows)
    return i


def test_a_lake_trained_checkpoint_loads_without_its_lake_and_serves(tmp_path: Path):
    import argparse

    from models.checkpoint import load_checkpoint
    from ugt.train_cli import add_arguments, run

    def train_main(argv: list[str]) -> int:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return run(parser.parse_args(argv))

    from serving.ugt_generator import UGTGenerator

    lake = tmp_path / "events_tokens"
    last = write_events(lake, users=16, per_user=8, first=0, items=24)
    out = tmp_path / "run"
    assert train_main(["--config", "models/configs/ugt_ml100k_tiny.yaml", "--lake", str(lake), "--out-dir",
                       str(out), "--device", "cpu", "--quiet", "--set", "max_epochs=1"]) == 0
    checkpoint = out / "checkpoint.pt"
    _, _, trained, _ = load_checkpoint(checkpoint)
    vocab = dict(trained.vocab.item_to_index)
    assert set(vocab) == {f"m{i}" for i in range(24)}

    write_events(lake, users=4, per_user=8, first=last, items=40)  # the stream went on: new items, new users
    model, cfg, data, ckpt = load_checkpoint(checkpoint)
    assert cfg.dataset == f"lake:{lake}"
    assert dict(data.vocab.item_to_index) == vocab == ckpt["vocab"]  # what was trained, not the grown lake
    assert data.item_genres.shape[0] == len(vocab) + 1

    generator = UGTGenerator(checkpoint)  # what `ugt serve` does with `checkpoint:`
    assert generator.num_items == len(vocab)
    assert np.isfinite(generator.table.numpy()).all()
