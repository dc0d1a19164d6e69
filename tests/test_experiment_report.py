"""`ugt experiment report`: the statistics (delta-method CTR variance, lift, z-test, SRM) and the CLI's output."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest

from jobs.feedback_join_logic import Feedback, Impression, JoinConfig, offline_metrics
from ugt import experiment_cli
from ugt.experiment_stats import ArmTotals, compare, ratio_and_variance, report, sample_ratio, wilson

MIN = 60_000
CONFIG = JoinConfig(attribution_ms=10 * MIN, metric_window_ms=5 * MIN, ctr_ks=(1, 5))


def simulated_rows(users: int, p: dict[str, float], seed: int = 1, per_user: int = 4) -> list[dict]:
    """Users split evenly between arms; each impression is clicked with its arm's probability."""
    rng = random.Random(seed)
    impressions, events = [], []
    arms = list(p)
    for u in range(users):
        arm = arms[u % len(arms)]
        for i in range(per_user):
            at = rng.randint(0, 60 * MIN)
            items = tuple(rng.sample(range(100), 5))
            impressions.append(Impression(f"{u}-{i}", str(u), "exp", arm, at, tuple(map(str, items))))
            if rng.random() < p[arm]:
                events.append(Feedback(f"{u}-{i}", str(u), str(rng.choice(items)), "CLICK", at + 1000))
    return offline_metrics(impressions, events, CONFIG)


def totals(users: int, n: list[int], c: list[int]) -> ArmTotals:
    t = ArmTotals("x")
    t.counts.update(users=users, impressions=sum(n), clicked=sum(c), user_n2=sum(a * a for a in n),
                    user_c2=sum(b * b for b in c), user_nc=sum(a * b for a, b in zip(n, c, strict=True)))
    return t


def test_delta_method_matches_the_closed_form_on_one_impression_per_user() -> None:
    """With n_u = 1 the clustered variance is the binomial p(1-p)/N (times N/(N-1), the sample variance)."""
    n = [1] * 200
    c = [1] * 50 + [0] * 150
    ratio, var = ratio_and_variance(totals(200, n, c))
    assert ratio == 0.25
    assert var == pytest.approx(0.25 * 0.75 / 200 * 200 / 199)


def test_clustered_variance_grows_when_a_users_impressions_move_together() -> None:
    spread = totals(4, [4, 4, 4, 4], [2, 2, 2, 2])  # every user half clicked
    clumped = totals(4, [4, 4, 4, 4], [4, 4, 0, 0])  # same CTR, all or nothing per user
    assert ratio_and_variance(spread) == (0.5, 0.0)
    assert ratio_and_variance(clumped)[1] > 0.0


def test_wilson_interval() -> None:
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 0.0)


def test_sample_ratio_mismatch() -> None:
    assert not sample_ratio({"A": 5010, "B": 4990}, {"A": 0.5, "B": 0.5})["mismatch"]
    broken = sample_ratio({"A": 5300, "B": 4700}, {"A": 0.5, "B": 0.5})
    assert broken["mismatch"] and broken["p_value"] < 1e-6
    # shares are normalised over the arms: 0.05 / 0.05 of a 10 % experiment is a 50/50 split
    assert sample_ratio({"A": 100, "B": 100}, {"A": 0.05, "B": 0.05})["expected"] == [100.0, 100.0]


def test_a_planted_lift_is_found_and_an_aa_test_is_not() -> None:
    rows = simulated_rows(3000, {"A": 0.10, "B": 0.15})
    result = report(rows, ["A", "B"], {"A": 0.5, "B": 0.5})
    a, b = result["arms"]
    assert result["control"] == "A" and a["ctr"] == pytest.approx(0.10, abs=0.015)
    vs = b["vs_control"]
    assert vs["p_value"] < 1e-4 and vs["lift_ci_low"] < 0.5 < vs["lift_ci_high"]
    assert not result["srm"]["mismatch"]
    aa = report(simulated_rows(3000, {"A": 0.10, "B": 0.10}, seed=2), ["A", "B"], {"A": 0.5, "B": 0.5})
    assert aa["arms"][1]["vs_control"]["p_value"] > 0.01


def test_arms_without_data_and_unknown_control() -> None:
    assert report([], ["A"], {"A": 1.0})["arms"] == []
    rows = simulated_rows(40, {"A": 0.2, "B": 0.2})
    assert report(rows, ["B", "A"], {}, control="nope")["control"] == "B"
    assert math.isnan(compare(ArmTotals("a"), ArmTotals("b"))["p_value"])


def watch_rows(users: int, seconds: dict[str, float], seed: int = 3) -> list[dict]:
    """Each user views one item of each of 3 impressions for their arm's mean seconds (±50 %) of a 100 s item."""
    rng = random.Random(seed)
    impressions, events = [], []
    for u in range(users):
        arm = "AB"[u % 2]
        for i in range(3):
            at = i * 20 * MIN + rng.randint(0, 5 * MIN)  # a user's impressions' attribution windows do not overlap
            impressions.append(Impression(f"{u}-{i}", str(u), "exp", arm, at, ("a", "b")))
            duration = round(seconds[arm] * rng.uniform(0.5, 1.5))
            events.append(Feedback(f"{u}-{i}", str(u), "a", "VIEW", at + 1000, float(duration), 100.0))
    return offline_metrics(impressions, events, CONFIG)


def test_watch_time_and_completion_are_reported_with_intervals_and_lifts() -> None:
    """Watch time per impression and the completion rate: ratios of per-user sums, with clustered intervals that
    hold the truth, and lifts against the control."""
    result = report(watch_rows(2000, {"A": 40.0, "B": 60.0}), ["A", "B"], {"A": 0.5, "B": 0.5})
    a, b = result["arms"]
    assert a["watch_s_per_impression"] == pytest.approx(40.0, rel=0.03)
    assert a["watch_s_ci"][0] < a["watch_s_per_impression"] < a["watch_s_ci"][1]
    assert a["watch_s"] == pytest.approx(a["watch_s_per_impression"] * a["impressions"])
    assert a["watched"] == a["impressions"] == 3000
    # a view completes at >= 90 s of the 100 s item: A's durations (20..60 s) never do, B's (30..90 s) at 90 only
    assert a["completions"] == 0 and 0 < b["completion_rate"] < 0.05
    assert b["completion_ci"][0] <= b["completion_rate"] <= b["completion_ci"][1]
    watch = b["watch_vs_control"]
    assert watch["lift"] == pytest.approx(0.5, abs=0.05) and watch["p_value"] < 1e-6
    assert watch["diff"] == pytest.approx(20.0, abs=2.0) and watch["diff_ci_low"] < watch["diff"]
    assert "completion_vs_control" in b and "watch_vs_control" not in a


def test_report_cli_prints_a_table_and_json(monkeypatch, capsys) -> None:
    rows = simulated_rows(400, {"control": 0.1, "treatment": 0.2})
    monkeypatch.setattr(experiment_cli, "rows_from_redis", lambda url, name: rows)
    parser = argparse.ArgumentParser()
    experiment_cli.add_arguments(parser)
    args = parser.parse_args(["report", "exp", "--shares", "control=0.5,treatment=0.5", "--redis", "redis://x"])
    assert experiment_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "control (control)" in out and "sample ratio (users)" in out and "lift vs control" in out
    assert "watch time treatment: 0.0 s per impression" in out and "completion treatment: 0.00%" in out
    args = parser.parse_args(["report", "exp", "--shares", "control=0.5,treatment=0.5", "--json"])
    assert experiment_cli.run(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["arm"] for a in data["arms"]] == ["control", "treatment"]
    assert data["arms"][1]["vs_control"]["p_value"] < 0.01


def test_report_cli_rejects_bad_shares(capsys) -> None:
    parser = argparse.ArgumentParser()
    experiment_cli.add_arguments(parser)
    assert experiment_cli.run(parser.parse_args(["report", "exp", "--shares", "a=half"])) == 1
    assert "--shares" in capsys.readouterr().err


def test_the_chi_square_tail_matches_the_tables():
    """chi2_sf (no scipy: docs/DEPENDENCIES.md) against textbook critical values and scipy's own outputs."""
    from ugt.experiment_stats import chi2_sf

    for x, df, p in ((3.841, 1, 0.0500137), (5.991, 2, 0.0500116), (0.5, 1, 0.4795001), (20.0, 3, 1.6974244e-4),
                     (0.01, 4, 0.9999875), (12.5, 7, 0.0852693), (100.0, 2, 1.9287498e-22)):
        assert abs(chi2_sf(x, df) - p) <= 1e-6 * max(p, 1e-16) + 1e-12, (x, df)
    assert chi2_sf(0.0, 3) == 1.0
