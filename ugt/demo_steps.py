"""The demo's later steps (ugt/demo.py runs them): similar items for a known and a brand-new movie, then a short A/B.

Similar items: `ugt similar build` over the retrained checkpoint, served by the same `ugt serve` (serving key
``similar_index``); the index follows the item job's feed, so the movie published while /recommend runs gets
neighbours without a rebuild. The A/B: ``python -m bench.ab_sim`` (a subprocess: ugt/ may not import bench/) with
a few hundred simulated ML-100K users against a fresh two-arm service (popularity vs a small UGT), its impressions
and the users' clicks and views joined by the feedback_join job, then `ugt experiment report`, the readout a person
would run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from infra.settings import REPO_ROOT, get_settings

SIMILAR_OUT = "runs/similar/ml1m-demo"
KNOWN_TITLE = "Matrix, The"  # the known movie whose neighbours the demo shows (else a recommended one)
AB_SHARES = "control=0.5,treatment=0.5"


def build_similar_index(ugt: str, checkpoint: Path, run: Callable[..., None]) -> Path:
    """`ugt similar build` over the demo's checkpoint (ID rows + semantic-ID codes + genres + decade; seconds)."""
    run(ugt, "similar", "build", "--checkpoint", str(checkpoint), "--out", SIMILAR_OUT, "--quiet")
    return REPO_ROOT / SIMILAR_OUT


def known_item(title_of: Mapping[str, str], fallback: str) -> str:
    """The id of KNOWN_TITLE in the catalog, else ``fallback``."""
    return next((item for item, title in title_of.items() if title == KNOWN_TITLE), fallback)


def similar_titles(base: str, item_id: str, title_of: Mapping[str, str], k: int = 5,
                   timeout_s: float = 30.0) -> list[str] | None:
    """GET /similar/{item_id}?k=k as "title (score)"; a brand-new item is asked again until the index has taken it
    from the feed (404 until then); None when it never does within ``timeout_s``."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        response = requests.get(f"{base}/similar/{item_id}", params={"k": k}, timeout=10)
        if response.ok:
            return [f"{title_of.get(i['item_id'], i['item_id'])} ({i['score']:.2f})" for i in response.json()["items"]]
        if response.status_code != 404 or time.monotonic() > deadline:
            print(f"GET /similar/{item_id}: {response.status_code} {response.text[:300]}")
            return None
        time.sleep(0.2)


def show_similar(base: str, items: list[tuple[str, str]], title_of: Mapping[str, str]) -> None:
    """Print each (item id, title)'s nearest items by title."""
    for item_id, title in items:
        found = similar_titles(base, item_id, title_of)
        if found is not None:
            print(f"  similar to {title!r}: " + "; ".join(found))


def run_ab(ugt: str, users: int, run: Callable[..., None]) -> str:
    """A short A/B through the running stack; prints its readout and returns the experiment's name.

    ``bench.ab_sim --tokenize running`` uses the demo's tokenize job and submits only feedback_join (the
    cluster's fourth slot); 15 s windows and attribution, so the readout is ready about 30 s after the traffic.
    """
    run_id = f"demo{int(time.time())}"
    out = get_settings().var_dir / "demo" / "ab_sim.json"
    run(sys.executable, "-m", "bench.ab_sim", "--users", str(users), "--rounds", "2", "--rate", "30",
        "--join-impressions", "0", "--tokenize", "running", "--run-id", run_id, "--out", str(out))
    experiment = f"ab-{run_id}"
    print(f"\nthe readout (metrics stay in Redis: run it again any time; {out} has the simulator's own counts):")
    run(ugt, "experiment", "report", experiment, "--shares", AB_SHARES)
    return experiment
