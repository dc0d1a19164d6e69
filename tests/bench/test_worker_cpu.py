"""bench/worker_cpu.py's pure parts: the baseline tree it extracts and the per-rate summary of its rows."""

from __future__ import annotations

import subprocess

from bench.worker_cpu import REPO, extract, summary


def test_extract_gives_the_revision_tree_and_its_commit(tmp_path):
    tree, commit = extract("HEAD", tmp_path / "tree")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    assert commit == head
    committed = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:serving/feast_redis.py"], check=True,
                               capture_output=True, text=True).stdout
    assert (tree / "serving" / "feast_redis.py").read_text() == committed


def test_summary_averages_each_tree_over_the_repeats_and_gives_the_ratio():
    rows = [{"config": "baseline", "offered_qps": 100.0, "worker_cpu_ms_per_req": 1.0},
            {"config": "current", "offered_qps": 100.0, "worker_cpu_ms_per_req": 0.7},
            {"config": "baseline", "offered_qps": 100.0, "worker_cpu_ms_per_req": 1.2},
            {"config": "current", "offered_qps": 100.0, "worker_cpu_ms_per_req": 0.9},
            {"config": "baseline", "offered_qps": 200.0, "worker_cpu_ms_per_req": 0.5}]
    got = summary(rows, ("baseline", "current"))
    assert got[0] == {"offered_qps": 100.0, "baseline_worker_cpu_ms_per_req": 1.1,
                      "current_worker_cpu_ms_per_req": 0.8, "ratio": round(0.8 / 1.1, 3)}
    assert got[1]["current_worker_cpu_ms_per_req"] is None and got[1]["ratio"] is None
