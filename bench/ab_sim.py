"""A/B traffic simulator: real `ugt serve` + Kafka + the tokenize and feedback_join jobs, with a planted effect.

    python -m bench.ab_sim [--users 2000] [--rounds 3] [--p-control 0.10] [--lift 0.3]   # on a running stack

Users with seeded histories (Feast) call POST /recommend on a service running a two-arm experiment (control:
popularity; treatment: popularity with MMR diversity) with impressions on. Each answer's user clicks one of its
items with probability p (control) or p x (1 + lift) (treatment), position chosen ∝ 1/(1 + position), sometimes
buys it, sometimes skips another item; the events go to events.raw as Avro, through the tokenize job to
events.tokens, and the feedback_join job joins them with the impressions the service published. The readout is
`ugt experiment report`'s (ugt/experiment_stats.py) over the metrics in Redis, checked against what the simulator
itself decided (the ground truth). Writes bench/results/ab_sim.json. The planted effect is in the click model, not
in the models: this measures the measurement (join, attribution, statistics), not a recommender.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import REPO, result_path, write_result

ITEMS = 500  # the simulated catalog
CONTROL, TREATMENT = "control", "treatment"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=2000, help="simulated users (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="requests per user (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="items per answer (default: %(default)s)")
    p.add_argument("--p-control", type=float, default=0.10, help="click probability per impression, control")
    p.add_argument("--lift", type=float, default=0.30, help="planted relative lift of the treatment's click rate")
    p.add_argument("--buy", type=float, default=0.25, help="probability a click is followed by a purchase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the metrics")
    p.add_argument("--out", default=str(result_path("ab_sim")))
    return p.parse_args(argv)


def seed_users(settings: Any, domain: str, users: list[str], seed: int) -> None:
    """Each user a 20-event history in Feast (so the arm's model answers, not the cold-start fallback), and the
    domain's popularity list."""
    import subprocess

    import pandas as pd
    import redis
    from feast.data_source import PushMode

    from contracts.tokenizer import TokenizedEvent
    from contracts.user_state_rule import states_from_events
    from infra.feast_store import open_feature_store

    store = open_feature_store(settings)
    try:
        store.get_feature_service("recommend_v1")
    except Exception:  # a fresh var/: apply the repo once, as `ugt stack up` users do
        feast = Path(sys.executable).parent / "feast"  # the venv that runs this bench
        subprocess.run([str(feast), "-c", str(settings.feature_repo), "apply"], check=True, cwd=REPO)
        store = open_feature_store(settings)
    rng = random.Random(seed)
    base = int(time.time() * 1000) - 86_400_000
    events = [TokenizedEvent(event_id=f"{u}-h{n}", user_id=u, item_id=str(item), event_time=base + n * 60_000,
                             domain=domain, action_token=2, rating_token=8, duration_token=0, hour_token=10)
              for u in users for n, item in enumerate(rng.sample(range(ITEMS), 20))]
    frame = pd.DataFrame([s.to_feature_row() for s in states_from_events(events).values()])
    frame["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    store.push("user_recent_events_push", frame, to=PushMode.ONLINE)
    redis.Redis.from_url(settings.redis_url).zadd(f"ugt:popularity:{domain}",
                                                  {str(i): float(ITEMS - i) ** 1.2 for i in range(ITEMS)})


def start_jobs(run: str, settings: Any) -> list[str]:
    """tokenize and feedback_join on the cluster, reading from the latest offsets; returns their job ids."""
    from jobs.cli import list_jobs, submit

    common = ["--startup", "latest", "--checkpoint-interval-ms", "2000"]
    jids = [
        submit("tokenize", ["--", *common, "--group-id", f"absim-tok-{run}", "--no-semantic-ids", "--lake", ""],
               detached=True),
        submit("feedback_join", ["--", *common, "--group-id", f"absim-fj-{run}", "--window-min", "1",
                                 "--attribution-min", "1", "--out-of-orderness-s", "10", "--idle-s", "5"],
               detached=True),
    ]
    base = settings.flink_rest_url
    deadline = time.monotonic() + 120
    import requests

    while time.monotonic() < deadline:  # every task running: the sources have taken their "latest" offsets
        states = [requests.get(f"{base}/jobs/{j}", timeout=5).json() for j in jids]
        if all(v["status"] == "RUNNING" for s in states for v in s["vertices"]):
            time.sleep(5.0)
            return [j for j in jids if j]
        time.sleep(1.0)
    raise SystemExit(f"bench.ab_sim: jobs not running after 120 s: {list_jobs(base)[:2]}")


def click_events(answer: dict[str, Any], p: float, buy: float, rng: random.Random) -> tuple[list[dict], bool]:
    """The user's reaction to one answer: at most one click (maybe a purchase) and sometimes a skip."""
    items = [it["item_id"] for it in answer["items"]]
    now = int(time.time() * 1000)
    out: list[dict[str, Any]] = []

    def event(item: str, action: str, delay_ms: int) -> dict[str, Any]:
        return {"event_id": uuid.uuid4().hex, "user_id": answer["user_id"], "item_id": item, "action": action,
                "event_time": now + delay_ms, "rating": None, "duration_s": None, "domain": answer["domain"],
                "context": {"source": "ab_sim"}}

    if rng.random() < 0.2 and items:
        out.append(event(items[-1], "SKIP", 300))
    clicked = bool(items) and rng.random() < p
    if clicked:
        position = rng.choices(range(len(items)), weights=[1 / (1 + i) for i in range(len(items))])[0]
        click_ms = rng.randint(200, 2000)
        out.append(event(items[position], "CLICK", click_ms))
        if rng.random() < buy:
            out.append(event(items[position], "PURCHASE", click_ms + rng.randint(500, 1500)))
    return out, clicked


def simulate(args: argparse.Namespace, port: int, domain: str, users: list[str], publisher: Any) -> dict[str, Any]:
    """The traffic: every user `rounds` times in a shuffled order; returns the simulator's own counts."""
    import requests
    from tqdm import tqdm

    rng = random.Random(args.seed)
    p = {CONTROL: args.p_control, TREATMENT: args.p_control * (1 + args.lift)}
    truth: dict[str, dict[str, int]] = {}
    arm_of: dict[str, str] = {}
    # round after round in one shuffled order: a user's next request comes a whole round after the last (with
    # 2,000 users ~10 s, longer than their events' 3.5 s), so last touch credits each event to the answer it followed
    order = rng.sample(users, len(users)) * args.rounds
    session = requests.Session()
    started = time.monotonic()
    for user in tqdm(order, desc="requests", unit="req"):
        response = session.post(f"http://127.0.0.1:{port}/recommend",
                                json={"user_id": user, "k": args.k, "domain": domain}, timeout=10)
        response.raise_for_status()
        answer = response.json()
        answer["domain"] = domain
        arm = answer.get("arm")
        counts = truth.setdefault(arm or "none", {"impressions": 0, "clicked": 0, "fallbacks": 0})
        counts["impressions"] += 1
        counts["fallbacks"] += bool(answer.get("fallback"))
        if arm is None:
            continue
        arm_of[user] = arm
        events, clicked = click_events(answer, p[arm], args.buy, rng)
        counts["clicked"] += clicked
        for record in events:
            publisher.publish_user_event(record)
        publisher.poll(0)
    publisher.flush(30)
    elapsed = time.monotonic() - started
    users_per_arm = {a: sum(1 for v in arm_of.values() if v == a) for a in (CONTROL, TREATMENT)}
    return {"truth": truth, "users_per_arm": users_per_arm, "requests": len(order), "traffic_s": elapsed}


def flush_windows(settings: Any, publisher: Any, domain: str) -> None:
    """Move both inputs' event time an hour on (an impression outside the experiment and a user event), so the
    watermark passes every window now instead of in real time."""
    later = int(time.time() * 1000) + 3_600_000
    record = {"request_id": "ab_sim-flush", "user_id": "ab_sim-flush", "experiment": None, "arm": None,
              "model": "none", "domain": domain, "items": [], "served_at": later, "fallback": False,
              "fallback_reason": None}
    publisher.publish(settings.topics.impressions, "impression", record, key="ab_sim-flush")
    publisher.publish_user_event({"event_id": uuid.uuid4().hex, "user_id": "ab_sim-flush", "item_id": "0",
                                  "action": "VIEW", "event_time": later, "rating": None, "duration_s": None,
                                  "domain": domain, "context": {}})
    publisher.flush(30)


def wait_metrics(settings: Any, experiment: str, expected_impressions: int, timeout_s: float) -> list[dict]:
    import redis

    from jobs.feedback_join_logic import metrics_from_redis

    client = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = metrics_from_redis(client, experiment)
        if sum(r["impressions"] for r in rows) >= expected_impressions:
            return rows
        time.sleep(2.0)
    return rows


def report_command(experiment: str, serving_url: str | None = None) -> list[str]:
    """`ugt experiment report NAME`, the CLI a person would run (bench may not import ugt/)."""
    command = ["ugt", "experiment", "report", experiment, "--shares", f"{CONTROL}=0.5,{TREATMENT}=0.5"]
    return command + (["--serving-url", serving_url] if serving_url else [])


def report_json(experiment: str, serving_url: str | None = None) -> dict[str, Any]:
    """The readout as JSON, with each arm's serving p99 and failures while the service still runs."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", *report_command(experiment, serving_url), "--json"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"bench.ab_sim: ugt experiment report failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def readout(experiment: str, rows: list[dict], sim: dict[str, Any], args: argparse.Namespace,
            serving_url: str | None = None) -> dict[str, Any]:
    """Per arm: what the stream measured beside what the simulator did; the test and whether the lift came back."""
    result = report_json(experiment, serving_url)
    clicked = {arm: sum(r["clicked"] for r in rows if r["arm"] == arm) for arm in (CONTROL, TREATMENT)}
    arms = {}
    for arm in result["arms"]:
        name, truth = arm["arm"], sim["truth"].get(arm["arm"], {})
        arms[name] = {
            "impressions": arm["impressions"], "users": arm["users"], "ctr": arm["ctr"], "ctr_ci": arm["ctr_ci"],
            "ctr_at": {k: v["ctr"] for k, v in arm["ctr_at"].items()}, "conversion_rate": arm["conversion_rate"],
            "position_ctr": arm["position_ctr"][:args.k], "items_covered": arm["items_covered"],
            "fallback_rate": arm["fallback_rate"],
            "simulated": {"impressions": truth.get("impressions", 0), "clicked": truth.get("clicked", 0),
                          "users": sim["users_per_arm"].get(name, 0)},
            "measured_clicked": clicked.get(name, 0),
            "serving": ((result.get("serving") or {}).get("arms") or {}).get(name),  # p99_s, fallback/error rate
            "planted_click_p": args.p_control * (1 + (args.lift if name == TREATMENT else 0.0)),
        }
        if "vs_control" in arm:
            arms[name]["vs_control"] = arm["vs_control"]
    vs = arms.get(TREATMENT, {}).get("vs_control", {})
    recovered = bool(vs) and vs["p_value"] < 0.05 and vs["lift_ci_low"] <= args.lift <= vs["lift_ci_high"]
    exact = all(a["measured_clicked"] == a["simulated"]["clicked"]
                and a["impressions"] == a["simulated"]["impressions"] for a in arms.values())
    return {"arms": arms, "srm_p_value": (result["srm"] or {}).get("p_value"),
            "srm_mismatch": (result["srm"] or {}).get("mismatch"), "planted_lift": args.lift,
            "measured_lift": vs.get("lift"), "p_value": vs.get("p_value"), "planted_lift_recovered": recovered,
            "stream_equals_simulation": exact}


def main(argv: list[str] | None = None) -> int:
    from bench.serving import start_server
    from infra.settings import get_settings
    from jobs.cli import cancel
    from streams.producer import EventPublisher
    from streams.topics import ensure_pipeline

    args = parse_args(argv)
    settings = get_settings()
    run = uuid.uuid4().hex[:8]
    domain, experiment = f"absim-{run}", f"ab-{run}"
    users = [f"absim-{run}-u{i}" for i in range(args.users)]
    ensure_pipeline(settings)
    seed_users(settings, domain, users, args.seed)
    config = {"generator": "popularity", "default_domain": domain, "log_level": "warning", "impressions": True,
              "experiments": {experiment: {"domains": [domain], "arms": {
                  CONTROL: {"share": 0.5}, TREATMENT: {"share": 0.5, "generator_version": "v2"}}}}}
    jids = start_jobs(run, settings)
    server = start_server("ab_sim", Path(tempfile.mkdtemp(prefix="ab_sim-")), dict(os.environ), config, workers=1)
    try:
        with EventPublisher(settings) as publisher:
            sim = simulate(args, server.port, domain, users, publisher)
            time.sleep(3.0)  # the service's impression thread hands its last records to Kafka
            flushed = time.monotonic()
            flush_windows(settings, publisher, domain)
        in_experiment = sum(v["impressions"] for k, v in sim["truth"].items() if k != "none")
        rows = wait_metrics(settings, experiment, in_experiment, args.timeout)
        metrics_delay = time.monotonic() - flushed
        results = readout(experiment, rows, sim, args, f"http://127.0.0.1:{server.port}")
    finally:
        server.stop()
        for jid in jids:
            cancel(settings.flink_rest_url, jid)
    results.update({"requests": sim["requests"], "traffic_s": round(sim["traffic_s"], 1),
                    "requests_per_s": round(sim["requests"] / sim["traffic_s"], 1),
                    "flush_to_metrics_s": round(metrics_delay, 1), "windows": len(rows)})
    conditions = {"users": args.users, "rounds": args.rounds, "k": args.k, "p_control": args.p_control,
                  "planted_lift": args.lift, "buy": args.buy, "seed": args.seed, "shares": "50/50",
                  "attribution_min": 1, "window_min": 1, "arms": "control: popularity-v1; treatment: popularity-v2",
                  "path": "ugt serve (1 worker) -> events.impressions; clicks -> events.raw -> tokenize (Flink) -> "
                          "events.tokens; feedback_join (Flink, parallelism 1) -> Redis",
                  "clock": "real time; after the traffic one impression and one event an hour later close the windows"}
    write_result(args.out, "ab_sim", conditions, results, argv, "python -m bench.ab_sim")
    for name, arm in results["arms"].items():
        print(f"{name}: {arm['impressions']} impressions, CTR {arm['ctr']:.4f} "
              f"[{arm['ctr_ci'][0]:.4f}, {arm['ctr_ci'][1]:.4f}], simulated {arm['simulated']}")
    print(f"lift {results['measured_lift']}, p {results['p_value']}, SRM p {results['srm_p_value']}, "
          f"recovered {results['planted_lift_recovered']}, exact {results['stream_equals_simulation']}")
    print(f"the readout again (the metrics stay in Redis): {' '.join(report_command(experiment))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
