"""bench/history_hop_quality.py end to end on CPU with the tiny ML-100K UGT, so the GPU run cannot fail for a
silly reason: one row per (split, hop), hop 0 the anchor, windows shorter with a hop, a bad hop refused."""

from __future__ import annotations

import json

import pytest

from bench import history_hop_quality


def test_history_hop_quality_rows_per_split_and_hop(trained, tmp_path):
    out = tmp_path / "hop.json"
    assert history_hop_quality.main(["--checkpoint", str(trained), "--hops", "0,8,32", "--splits", "valid",
                                     "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["split"], r["hop"]) for r in rows] == [("valid", 0), ("valid", 8), ("valid", 32)]
    anchor, hop8, hop32 = rows
    assert anchor["delta_hr@10"] == 0 and anchor["full_windows"] > 0
    assert anchor["mean_window"] > hop8["mean_window"] > hop32["mean_window"]  # fewer events per window
    assert hop32["full_windows"] < anchor["full_windows"]
    assert all(0 <= r["hr@10"] <= r["hr@50"] <= r["hr@200"] <= 1 for r in rows)
    assert record["benchmark"] == "history_hop_quality" and record["conditions"]["hops"] == "0,8,32"
    assert record["device"].startswith("cpu") and record["max_len"] == 50


def test_history_hop_quality_refuses_a_hop_at_or_past_the_window(trained, tmp_path):
    with pytest.raises(SystemExit, match="--hops"):
        history_hop_quality.main(["--checkpoint", str(trained), "--hops", "0,50", "--device", "cpu",
                                  "--out", str(tmp_path / "x.json")])
