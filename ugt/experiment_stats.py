"""The statistics of `ugt experiment report`: per-arm totals, intervals, the arm-vs-control test and the SRM check.

Users are randomised, not impressions: a user's impressions are correlated, so an impression-level binomial
interval is too narrow. The CTR (share of impressions with an interaction) is a ratio of per-user sums, and its
variance is the delta method's over users (Deng et al., "Applying the Delta Method in Metric Analytics", 2018)::

    R = C / N,   var(R) = (s²_c - 2 R s_nc + R² s²_n) / (U n̄²)

from U users, N = Σn and C = Σc, and the sums Σn², Σc², Σnc that the feedback_join job adds up per arm. Watch time
per impression (C = Σ watch ms) and the completion rate (C = Σ completed impressions) are ratios of per-user sums
the same way, from Σw², Σnw and Σm², Σnm (:data:`RATIO_METRICS`). CTR@k,
conversion and item CTR get Wilson intervals over impressions (documented as impression-level). The sample-ratio
check is a chi-square of users per arm against the configured shares: a p-value below 0.001 means the split is
broken (assignment, logging or joins lose one arm's users) and no other number of the report can be trusted.

The distributions come from the standard library (statistics.NormalDist) and :func:`chi2_sf` (a dozen lines of
Numerical Recipes), not scipy: Feast's offline store imports dask, which imports scipy.sparse when scipy is
installed, and scipy's pybind11 modules deadlock inside PyFlink's thread-mode interpreter (the user_state job's
task hung in open()). docs/DEPENDENCIES.md says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from jobs.feedback_join_logic import ADDITIVE

SRM_ALPHA = 0.001  # the usual threshold: SRM checks run on every experiment, so false alarms must be rare
# per-user ratio metrics over impressions: name -> (numerator Σc, its Σc² over users, Σnc over users)
RATIO_METRICS = {"ctr": ("clicked", "user_c2", "user_nc"), "watch_ms": ("watch_ms", "user_w2", "user_nw"),
                 "completion": ("completions", "user_m2", "user_nm")}


@dataclass
class ArmTotals:
    """An arm's metrics summed over windows."""

    arm: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ADDITIVE, 0))
    clicked_at: dict[str, int] = field(default_factory=dict)
    position_impressions: list[int] = field(default_factory=list)
    position_clicks: list[int] = field(default_factory=list)
    items_covered: int = 0
    windows: int = 0
    first_window: int | None = None
    last_window_end: int | None = None

    def add(self, row: Mapping[str, Any]) -> None:
        for key in ADDITIVE:
            self.counts[key] += int(row.get(key, 0))
        for k, v in (row.get("clicked_at") or {}).items():
            self.clicked_at[str(k)] = self.clicked_at.get(str(k), 0) + int(v)
        for name in ("position_impressions", "position_clicks"):
            mine, theirs = getattr(self, name), list(row.get(name) or [])
            mine.extend([0] * (len(theirs) - len(mine)))
            for p, v in enumerate(theirs):
                mine[p] += int(v)
        self.items_covered = max(self.items_covered, int(row.get("items_covered", 0)))
        self.windows += 1
        start, end = int(row["window_start"]), int(row["window_end"])
        self.first_window = start if self.first_window is None else min(self.first_window, start)
        self.last_window_end = end if self.last_window_end is None else max(self.last_window_end, end)


def totals_by_arm(rows: Iterable[Mapping[str, Any]]) -> dict[str, ArmTotals]:
    out: dict[str, ArmTotals] = {}
    for row in rows:
        out.setdefault(str(row["arm"]), ArmTotals(str(row["arm"]))).add(row)
    return out


_NORMAL = NormalDist()


def z_of(confidence: float) -> float:
    return _NORMAL.inv_cdf(0.5 + confidence / 2)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df): Q(df/2, x/2), the regularized upper incomplete gamma function, by its
    series below a + 1 and Lentz's continued fraction above (Numerical Recipes, 2nd ed., 6.2)."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_front = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= z / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = z + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ((0, 0) when n is 0)."""
    if n <= 0:
        return 0.0, 0.0
    z = z_of(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ratio_and_variance(t: ArmTotals, metric: str = "ctr") -> tuple[float, float]:
    """A ratio metric C/N (:data:`RATIO_METRICS`, the CTR by default) and its user-clustered (delta-method)
    variance; variance nan with fewer than 2 users."""
    c = t.counts
    numerator, c2, nc = RATIO_METRICS[metric]
    users, n_sum, c_sum = c["users"], c["impressions"], c[numerator]
    if n_sum == 0:
        return 0.0, math.nan
    ratio = c_sum / n_sum
    if users < 2:
        return ratio, math.nan
    var_n = (c["user_n2"] - n_sum * n_sum / users) / (users - 1)
    var_c = (c[c2] - c_sum * c_sum / users) / (users - 1)
    cov = (c[nc] - n_sum * c_sum / users) / (users - 1)
    mean_n = n_sum / users
    return ratio, max(0.0, (var_c - 2 * ratio * cov + ratio * ratio * var_n) / (users * mean_n * mean_n))


def compare(control: ArmTotals, arm: ArmTotals, confidence: float = 0.95, metric: str = "ctr") -> dict[str, float]:
    """The arm's metric (the CTR by default) against the control's: difference, relative lift (with intervals)
    and a two-sided z-test."""
    r0, v0 = ratio_and_variance(control, metric)
    r1, v1 = ratio_and_variance(arm, metric)
    se = math.sqrt(v0 + v1) if not (math.isnan(v0) or math.isnan(v1)) else math.nan
    z = z_of(confidence)
    diff = r1 - r0
    lift = diff / r0 if r0 > 0 else math.nan
    # delta method on r1 / r0 (independent arms): var ≈ v1 / r0² + r1² v0 / r0⁴
    lift_se = math.sqrt(v1 / r0**2 + r1**2 * v0 / r0**4) if r0 > 0 and not math.isnan(se) else math.nan
    stat = diff / se if se and not math.isnan(se) else math.nan
    p = 2 * (1 - _NORMAL.cdf(abs(stat))) if not math.isnan(stat) else math.nan
    return {"diff": diff, "diff_ci_low": diff - z * se, "diff_ci_high": diff + z * se,
            "lift": lift, "lift_ci_low": lift - z * lift_se, "lift_ci_high": lift + z * lift_se,
            "z": stat, "p_value": p}


def sample_ratio(observed: Mapping[str, int], shares: Mapping[str, float]) -> dict[str, Any]:
    """Chi-square of users per arm against the configured shares (normalised over these arms)."""
    arms = [a for a in shares if shares[a] > 0]
    total_share = sum(shares[a] for a in arms)
    counts = [int(observed.get(a, 0)) for a in arms]
    n = sum(counts)
    if len(arms) < 2 or n == 0:
        return {"arms": arms, "observed": counts, "expected": [], "chi2": math.nan, "p_value": math.nan,
                "mismatch": False}
    expected = [n * shares[a] / total_share for a in arms]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(counts, expected, strict=True))  # Pearson's statistic
    p = chi2_sf(chi2, len(arms) - 1)
    return {"arms": arms, "observed": counts, "expected": expected, "chi2": float(chi2), "p_value": float(p),
            "mismatch": bool(p < SRM_ALPHA)}


def arm_summary(t: ArmTotals, confidence: float = 0.95) -> dict[str, Any]:
    """One arm's rates with their intervals."""
    c = t.counts
    n = c["impressions"]
    ctr, var = ratio_and_variance(t)
    half = z_of(confidence) * math.sqrt(var) if not math.isnan(var) else math.nan
    watch_ms, watch_var = ratio_and_variance(t, "watch_ms")
    watch_half = z_of(confidence) * math.sqrt(watch_var) / 1000 if not math.isnan(watch_var) else math.nan
    done, done_var = ratio_and_variance(t, "completion")
    done_half = z_of(confidence) * math.sqrt(done_var) if not math.isnan(done_var) else math.nan
    ctr_at = {k: {"ctr": v / n if n else 0.0, "ci": wilson(v, n, confidence)}
              for k, v in sorted(t.clicked_at.items(), key=lambda kv: int(kv[0]))}
    return {
        "arm": t.arm, "impressions": n, "users": c["users"], "windows": t.windows,
        "ctr": ctr, "ctr_ci": (ctr - half, ctr + half),
        "ctr_at": ctr_at,
        "conversion_rate": c["conversions"] / n if n else 0.0, "conversion_ci": wilson(c["conversions"], n, confidence),
        "item_ctr": c["item_clicks"] / c["items_shown"] if c["items_shown"] else 0.0,
        "position_ctr": [cl / im if im else 0.0 for cl, im in zip(t.position_clicks, t.position_impressions,
                                                                   strict=True)],
        "items_covered": t.items_covered,
        "fallback_rate": c["fallbacks"] / n if n else 0.0,
        "watch_s": c["watch_ms"] / 1000, "watched": c["watched"],
        "watch_s_per_impression": watch_ms / 1000,
        "watch_s_ci": (watch_ms / 1000 - watch_half, watch_ms / 1000 + watch_half),
        "completions": c["completions"], "completion_rate": done, "completion_ci": (done - done_half, done + done_half),
        "first_window": t.first_window, "last_window_end": t.last_window_end,
    }


def report(rows: Iterable[Mapping[str, Any]], arm_order: Sequence[str], shares: Mapping[str, float],
           control: str | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """The whole readout: arms in config order (then any others), each against the control (default: the first)."""
    totals = totals_by_arm(rows)
    order = [a for a in arm_order if a in totals] + sorted(a for a in totals if a not in arm_order)
    if not order:
        return {"arms": [], "control": None, "srm": sample_ratio({}, shares), "confidence": confidence}
    control = control if control in totals else order[0]
    arms = []
    for name in order:
        summary = arm_summary(totals[name], confidence)
        if name != control:
            summary["vs_control"] = compare(totals[control], totals[name], confidence)
            watch = compare(totals[control], totals[name], confidence, "watch_ms")
            summary["watch_vs_control"] = {k: v / 1000 if k.startswith("diff") else v for k, v in watch.items()}
            summary["completion_vs_control"] = compare(totals[control], totals[name], confidence, "completion")
        arms.append(summary)
    observed = {a: totals[a].counts["users"] for a in totals}
    return {"arms": arms, "control": control, "confidence": confidence,
            "srm": sample_ratio(observed, shares) if shares else None}
