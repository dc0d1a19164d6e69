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


def test_industrial_summary_takes_each_trees_median_and_weights_the_mix():
    from bench.worker_cpu_industrial import MIX, mixed
    from bench.worker_cpu_industrial import summary as stage_summary

    def row(config, miss, hit, append):
        stages = {"miss": {"cpu_us": miss, "decode": 1.0}, "hit": {"cpu_us": hit}, "append": {"cpu_us": append}}
        return {"config": config, "history": 1024, "stages": stages}

    rows = [row("baseline", 1000, 400, 500), row("baseline", 1200, 380, 560), row("baseline", 1100, 390, 540),
            row("current", 600, 60, 200), row("current", 650, 70, 190), row("current", 640, 65, 210)]
    assert mixed(rows[0]["stages"]) == MIX["miss"] * 1000 + MIX["hit"] * 400 + MIX["append"] * 500
    got = {(r["kind"], r["stage"]): r for r in stage_summary(rows, ("baseline", "current"))}
    assert got[("miss", "cpu_us")]["baseline_us"] == 1100 and got[("miss", "cpu_us")]["current_us"] == 640
    assert got[("miss", "cpu_us")]["ratio"] == round(640 / 1100, 3)
    assert got[("mix", "decode")]["baseline_us"] == MIX["miss"] * 1.0  # a stage one kind has: 0 in the others
    assert got[("mix", "cpu_us")]["current_us"] == round(sorted(mixed(r["stages"]) for r in rows[3:])[1], 2)
    assert ("hit", "decode") not in got
