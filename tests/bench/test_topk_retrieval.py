"""The top-k retrieval bench (bench/topk_retrieval.py) end to end on a tiny CPU grid, so the GPU run cannot fail for
a silly reason, and its agreement check catches a wrong answer."""

from __future__ import annotations

import json

import torch

from bench import topk_retrieval


def test_the_bench_writes_every_variant_with_measured_recall(tmp_path):
    out = tmp_path / "topk.json"
    topk_retrieval.main(["--items", "3000", "--dims", "16", "--batches", "4,40", "--ks", "5,50", "--blocks",
                         "512,4096", "--excl", "8", "--repeats", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "topk_retrieval" and record["conditions"]["anchor"] == "plain"
    rows = record["rows"]
    assert len(rows) == 2 * 2 * 3  # (batch, k) x (plain, blocked_512, faiss); 4096 > 3000 items: no such block
    assert {r["variant"] for r in rows} == {"plain", "blocked_512", "faiss_flat_ip"}
    for row in rows:
        assert row["recall_at_k"] == 1.0 and row["max_value_diff"] < 1e-5 and row["ms"] > 0
        assert "error" not in row and row["speedup_ms"] > 0


def test_agreement_reports_a_missed_item_and_a_wrong_score():
    want = (torch.tensor([[0.9, 0.5]]), torch.tensor([[3, 7]]))
    got = (torch.tensor([[0.9, 0.4]]), torch.tensor([[3, 8]]))
    result = topk_retrieval.agreement(got, want)
    assert result["recall_at_k"] == 0.5 and abs(result["max_value_diff"] - 0.1) < 1e-6
    assert topk_retrieval.agreement(want, want) == {"recall_at_k": 1.0, "max_value_diff": 0.0}
