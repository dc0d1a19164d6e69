"""A/B traffic simulator: real `ugt serve` + Kafka + the tokenize and feedback_join jobs, UGT against popularity.

    python -m bench.ab_sim [--mode relevance|planted] [--users 900] [--rounds 3] [--rate 30]   # on a running stack

``--mode relevance`` (default): ML-100K users (bench/ab_users.py), each with the first 70 % of their ratings as
their state in Feast and the rest held out as their future, call POST /recommend on a service running a two-arm
experiment (control: popularity over the histories; treatment: a UGT checkpoint trained on the histories only).
A user looks down the list (position i examined with probability 1/log2(i + 2)) and clicks the first examined item
with probability --p-hit if it is in their held-out future, --p-base otherwise (a cascade model), sometimes buys
it, sometimes skips another item. The lift is then the model's: its lists hold more of the users' futures.
A click is followed by a VIEW that reports the seconds watched of a WATCH_LENGTH_S item (its length in the event's
context, ``item_length_s``): the whole item with probability --p-finish-hit for an item of the user's future,
--p-finish-base otherwise, else a uniform share of 5-60 %; the join turns these into watch time and completion.

``--mode planted``: seeded synthetic histories, both arms popularity, and the click probability itself raised by
--lift in the treatment: a known effect, to check the measurement (join, attribution, statistics).

The events go to events.raw as Avro, through the tokenize job to events.tokens, and the feedback_join job joins
them with the impressions the service published. The readout is `ugt experiment report --json`'s over the metrics
in Redis, checked against what the simulator itself decided. Also measured (bench/ab_join.py): the delay from a
click to its window's row in Redis, and the join's throughput per TaskManager CPU-second on a backlog. Writes
bench/results/ab_sim.json.
"""

from __future__ import annotations

import argparse
import math
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
WATCH_LENGTH_S = 6000.0  # every simulated item is a 100-minute movie (the VIEW's context says so)
CONTROL, TREATMENT = "control", "treatment"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("relevance", "planted"), default="relevance",
                   help="relevance: UGT vs popularity, clicks on held-out futures; planted: a known lift in the "
                        "click model between two popularity arms (default: %(default)s)")
    p.add_argument("--users", type=int, default=900, help="simulated users (relevance: at most 943) (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="requests per user (default: %(default)s)")
    p.add_argument("--rate", type=float, default=30.0, help="requests per second, paced (0: as fast as the service "
                   "answers); live traffic keeps moving the watermark that closes windows (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="items per answer (default: %(default)s)")
    p.add_argument("--past-share", type=float, default=0.7, help="relevance: share of each user's ratings that is "
                   "their history; the rest is their future (default: %(default)s)")
    p.add_argument("--p-hit", type=float, default=0.5, help="relevance: click probability of an examined item in "
                   "the user's future (default: %(default)s)")
    p.add_argument("--p-base", type=float, default=0.02, help="relevance: click probability of any other examined "
                   "item (default: %(default)s)")
    p.add_argument("--p-control", type=float, default=0.10, help="planted: click probability per answer, control")
    p.add_argument("--lift", type=float, default=0.30, help="planted: relative lift of the treatment's click rate")
    p.add_argument("--buy", type=float, default=0.25, help="probability a click is followed by a purchase")
    p.add_argument("--p-finish-hit", type=float, default=0.7, help="a clicked item of the user's future is watched "
                   "to the end with this probability (default: %(default)s)")
    p.add_argument("--p-finish-base", type=float, default=0.2, help="any other clicked item is watched to the end "
                   "with this probability (default: %(default)s)")
    p.add_argument("--tokenize", choices=("submit", "running"), default="submit",
                   help="submit: a tokenize job of our own; running: use the stack's running tokenize job (the "
                        "demo's; one Flink slot fewer) (default: %(default)s)")
    p.add_argument("--run-id", default="", help="names the experiment ab-<run-id> and its domain (default: random)")
    p.add_argument("--window-s", type=int, default=15, help="the join's metric window (default: %(default)s)")
    p.add_argument("--attribution-s", type=int, default=15, help="the join's attribution window (default: %(default)s)")
    p.add_argument("--out-of-orderness-s", type=int, default=5, help="the join's watermark delay (default: %(default)s)")
    p.add_argument("--join-impressions", type=int, default=20000,
                   help="backlog for the join throughput measurement; 0 skips it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the metrics")
    p.add_argument("--out", default=str(result_path("ab_sim")))
    return p.parse_args(argv)


def ensure_feature_repo(settings: Any) -> None:
    """Apply the feature repo once on a fresh var/, as `ugt stack up` users do."""
    import subprocess

    from infra.feast_store import open_feature_store

    try:
        open_feature_store(settings).get_feature_service("recommend_v1")
    except Exception:
        feast = Path(sys.executable).parent / "feast"  # the venv that runs this bench
        subprocess.run([str(feast), "-c", str(settings.feature_repo), "apply"], check=True, cwd=REPO)


def seed_users(settings: Any, domain: str, users: list[str], seed: int) -> None:
    """Planted mode: each user a 20-event random history in Feast (so the arm's model answers, not the cold-start
    fallback), and the domain's popularity list."""
    import pandas as pd
    import redis
    from feast.data_source import PushMode

    from contracts.tokenizer import TokenizedEvent
    from contracts.user_state_rule import states_from_events
    from infra.feast_store import open_feature_store

    rng = random.Random(seed)
    base = int(time.time() * 1000) - 86_400_000
    events = [TokenizedEvent(event_id=f"{u}-h{n}", user_id=u, item_id=str(item), event_time=base + n * 60_000,
                             domain=domain, action_token=2, rating_token=8, duration_token=0, hour_token=10)
              for u in users for n, item in enumerate(rng.sample(range(ITEMS), 20))]
    frame = pd.DataFrame([s.to_feature_row() for s in states_from_events(events).values()])
    frame["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    open_feature_store(settings).push("user_recent_events_push", frame, to=PushMode.ONLINE)
    redis.Redis.from_url(settings.redis_url).zadd(f"ugt:popularity:{domain}",
                                                  {str(i): float(ITEMS - i) ** 1.2 for i in range(ITEMS)})


def wait_running(settings: Any, jids: list[str], timeout_s: float = 180.0) -> None:
    """Every task of every job running (so sources reading "latest" have taken their offsets), then 5 s more."""
    import requests

    from jobs.cli import list_jobs

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [requests.get(f"{settings.flink_rest_url}/jobs/{j}", timeout=5).json() for j in jids]
        if all(v["status"] == "RUNNING" for s in states for v in s["vertices"]):
            time.sleep(5.0)
            return
        time.sleep(1.0)
    raise SystemExit(f"bench.ab_sim: jobs not running after {timeout_s:.0f} s: {list_jobs(settings.flink_rest_url)[:2]}")


def start_jobs(run: str, settings: Any, args: argparse.Namespace) -> list[str]:
    """tokenize and feedback_join on the cluster, reading from the latest offsets; returns their job ids."""
    from jobs.cli import submit

    common = ["--startup", "latest", "--checkpoint-interval-ms", "2000"]
    own_tokenize = args.tokenize == "submit"
    jids = [
        submit("tokenize", ["--", *common, "--group-id", f"absim-tok-{run}", "--no-semantic-ids", "--lake", ""],
               detached=True) if own_tokenize else None,
        submit("feedback_join", ["--", *common, "--group-id", f"absim-fj-{run}",
                                 "--window-min", str(args.window_s / 60), "--attribution-min",
                                 str(args.attribution_s / 60), "--out-of-orderness-s", str(args.out_of_orderness_s),
                                 "--idle-s", "2"], detached=True),
    ]
    jids = [j for j in jids if j]
    wait_running(settings, jids)
    return jids


def planted_position(answer: dict[str, Any], p: float, rng: random.Random) -> int | None:
    """Planted mode: one click with probability p, its position ∝ 1/(1 + position)."""
    n = len(answer["items"])
    if not n or rng.random() >= p:
        return None
    return rng.choices(range(n), weights=[1 / (1 + i) for i in range(n)])[0]


def relevance_position(answer: dict[str, Any], future: frozenset[str], p_hit: float, p_base: float,
                       rng: random.Random) -> int | None:
    """Relevance mode (cascade): down the list, position i examined with probability 1/log2(i + 2); an examined
    item clicked with p_hit if in the user's held-out future, else p_base; the first click ends the look."""
    for position, item in enumerate(answer["items"]):
        if rng.random() < 1 / math.log2(position + 2):
            if rng.random() < (p_hit if item["item_id"] in future else p_base):
                return position
    return None


def click_events(answer: dict[str, Any], position: int | None, buy: float, p_finish: float,
                 rng: random.Random) -> tuple[list[dict], int | None]:
    """The user's reaction to one answer: the click at ``position``, its VIEW (the whole item with probability
    ``p_finish``, else 5-60 % of it), maybe a purchase, and sometimes a skip; returns the events and the click's
    event time."""
    items = [it["item_id"] for it in answer["items"]]
    now = int(time.time() * 1000)
    out: list[dict[str, Any]] = []

    def event(item: str, action: str, delay_ms: int) -> dict[str, Any]:
        return {"event_id": uuid.uuid4().hex, "user_id": answer["user_id"], "item_id": item, "action": action,
                "event_time": now + delay_ms, "rating": None, "duration_s": None, "domain": answer["domain"],
                "context": {"source": "ab_sim"}}

    if rng.random() < 0.2 and items:
        out.append(event(items[-1], "SKIP", 300))
    if position is None:
        return out, None
    click_ms = rng.randint(200, 2000)
    out.append(event(items[position], "CLICK", click_ms))
    watched = WATCH_LENGTH_S if rng.random() < p_finish else round(WATCH_LENGTH_S * rng.uniform(0.05, 0.6))
    out.append(event(items[position], "VIEW", click_ms + rng.randint(100, 400))  # reported at once, not at its end
               | {"duration_s": float(watched), "context": {"source": "ab_sim", "item_length_s": str(WATCH_LENGTH_S)}})
    if rng.random() < buy:
        out.append(event(items[position], "PURCHASE", click_ms + rng.randint(500, 1500)))
    return out, now + click_ms


def simulate(args: argparse.Namespace, port: int, domain: str, futures: dict[str, frozenset[str]],
             publisher: Any) -> dict[str, Any]:
    """The traffic: every user `rounds` times in a shuffled order; returns the simulator's own counts and, per
    click, (arm, window start of the impression, click time) for the delay."""
    import requests
    from tqdm import tqdm

    rng = random.Random(args.seed)
    planted = {CONTROL: args.p_control, TREATMENT: args.p_control * (1 + args.lift)}
    window_ms = args.window_s * 1000
    truth: dict[str, dict[str, int]] = {}
    arm_of: dict[str, str] = {}
    clicks: list[tuple[str, int, int]] = []
    # round after round in one shuffled order: a user's next request comes a whole round after the last (longer
    # than their events' 3.5 s), so last touch credits each event to the answer it followed
    order = rng.sample(sorted(futures), len(futures)) * args.rounds
    session = requests.Session()
    started = time.monotonic()
    for n, user in enumerate(tqdm(order, desc="requests", unit="req")):
        if args.rate > 0:
            time.sleep(max(0.0, started + n / args.rate - time.monotonic()))
        sent = int(time.time() * 1000)
        response = session.post(f"http://127.0.0.1:{port}/recommend",
                                json={"user_id": user, "k": args.k, "domain": domain}, timeout=30)
        response.raise_for_status()
        answered = int(time.time() * 1000)
        answer = response.json() | {"domain": domain}
        arm = answer.get("arm")
        counts = truth.setdefault(arm or "none", {"impressions": 0, "clicked": 0, "fallbacks": 0, "hits": 0,
                                                  "watch_ms": 0, "completions": 0})
        counts["impressions"] += 1
        counts["fallbacks"] += bool(answer.get("fallback"))
        counts["hits"] += sum(it["item_id"] in futures[user] for it in answer["items"])
        if arm is None:
            continue
        arm_of[user] = arm
        if args.mode == "planted":
            position = planted_position(answer, planted[arm], rng)
        else:
            position = relevance_position(answer, futures[user], args.p_hit, args.p_base, rng)
        hit = position is not None and answer["items"][position]["item_id"] in futures[user]
        events, clicked_at = click_events(answer, position, args.buy,
                                          args.p_finish_hit if hit else args.p_finish_base, rng)
        counts["clicked"] += clicked_at is not None
        views = [e["duration_s"] for e in events if e["action"] == "VIEW"]
        counts["watch_ms"] += sum(round(d * 1000) for d in views)
        counts["completions"] += any(d >= 0.9 * WATCH_LENGTH_S for d in views)  # the join's default share
        if clicked_at is not None and sent // window_ms == answered // window_ms:  # the impression's window is known
            clicks.append((arm, sent - sent % window_ms, clicked_at))
        for record in events:
            publisher.publish_user_event(record)
        publisher.poll(0)
    publisher.flush(30)
    elapsed = time.monotonic() - started
    users_per_arm = {a: sum(1 for v in arm_of.values() if v == a) for a in (CONTROL, TREATMENT)}
    return {"truth": truth, "users_per_arm": users_per_arm, "requests": len(order), "traffic_s": elapsed,
            "clicks": clicks}


def flush_windows(settings: Any, publisher: Any, domain: str, item_id: str) -> None:
    """Move both inputs' event time an hour on (an impression outside the experiment and a user event), so the
    watermark passes every window now instead of in real time. ``item_id``: a catalog item, since the user event
    also reaches tokenize's lake, which `ugt train --lake` reads (an unknown item stopped the demo's next run)."""
    later = int(time.time() * 1000) + 3_600_000
    record = {"request_id": "ab_sim-flush", "user_id": "ab_sim-flush", "experiment": None, "arm": None,
              "model": "none", "domain": domain, "items": [], "served_at": later, "fallback": False,
              "fallback_reason": None}
    publisher.publish(settings.topics.impressions, "impression", record, key="ab_sim-flush")
    publisher.publish_user_event({"event_id": uuid.uuid4().hex, "user_id": "ab_sim-flush", "item_id": item_id,
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
    """The readout as JSON (`ugt experiment report NAME --json`), with each arm's serving p99 and failures when
    ``serving_url`` names the running service."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", *report_command(experiment, serving_url), "--json"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"bench.ab_sim: ugt experiment report failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def readout(experiment: str, rows: list[dict], sim: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per arm: what the stream measured beside what the simulator did; the test, and the simulator's own lift."""
    result = report_json(experiment)
    clicked = {arm: sum(r["clicked"] for r in rows if r["arm"] == arm) for arm in (CONTROL, TREATMENT)}
    arms = {}
    for arm in result["arms"]:
        name, truth = arm["arm"], sim["truth"].get(arm["arm"], {})
        arms[name] = {
            "impressions": arm["impressions"], "users": arm["users"], "ctr": arm["ctr"], "ctr_ci": arm["ctr_ci"],
            "ctr_at": {k: v["ctr"] for k, v in arm["ctr_at"].items()}, "conversion_rate": arm["conversion_rate"],
            "position_ctr": arm["position_ctr"][:args.k], "items_covered": arm["items_covered"],
            "fallback_rate": arm["fallback_rate"],
            "watch_s_per_impression": arm["watch_s_per_impression"], "watch_s_ci": arm["watch_s_ci"],
            "completion_rate": arm["completion_rate"], "completion_ci": arm["completion_ci"],
            "watch_vs_control": arm.get("watch_vs_control"), "completion_vs_control": arm.get("completion_vs_control"),
            "measured_watch_ms": sum(r["watch_ms"] for r in rows if r["arm"] == name),
            "measured_completions": sum(r["completions"] for r in rows if r["arm"] == name),
            "simulated": {"impressions": truth.get("impressions", 0), "clicked": truth.get("clicked", 0),
                          "watch_ms": truth.get("watch_ms", 0), "completions": truth.get("completions", 0),
                          "users": sim["users_per_arm"].get(name, 0),
                          "future_items_per_list": round(truth.get("hits", 0) / max(1, truth.get("impressions", 0)),
                                                         3)},
            "measured_clicked": clicked.get(name, 0),
            "serving": (sim.get("serving") or {}).get(name),  # p99 and fallback / error rates, from /metrics
        }
        if args.mode == "planted":
            arms[name]["planted_click_p"] = args.p_control * (1 + (args.lift if name == TREATMENT else 0.0))
        if "vs_control" in arm:
            arms[name]["vs_control"] = arm["vs_control"]
    vs = arms.get(TREATMENT, {}).get("vs_control", {})
    sim_ctr = {a: v["simulated"]["clicked"] / max(1, v["simulated"]["impressions"]) for a, v in arms.items()}
    exact = all(a["measured_clicked"] == a["simulated"]["clicked"]
                and a["impressions"] == a["simulated"]["impressions"]
                and a["measured_watch_ms"] == a["simulated"]["watch_ms"]
                and a["measured_completions"] == a["simulated"]["completions"] for a in arms.values())
    out = {"arms": arms, "srm_p_value": (result["srm"] or {}).get("p_value"),
           "srm_mismatch": (result["srm"] or {}).get("mismatch"), "measured_lift": vs.get("lift"),
           "lift_ci": [vs.get("lift_ci_low"), vs.get("lift_ci_high")], "p_value": vs.get("p_value"),
           "simulated_lift": (sim_ctr[TREATMENT] / sim_ctr[CONTROL] - 1) if sim_ctr.get(CONTROL) else None,
           "stream_equals_simulation": exact}
    if args.mode == "planted":
        out["planted_lift"] = args.lift
        out["planted_lift_recovered"] = bool(vs) and vs["p_value"] < 0.05 and \
            vs["lift_ci_low"] <= args.lift <= vs["lift_ci_high"]
    return out


def serving_config(args: argparse.Namespace, domain: str, experiment: str) -> dict[str, Any]:
    """Control: popularity. Treatment: the UGT checkpoint (relevance) or popularity-v2 (planted)."""
    if args.mode == "planted":
        treatment: dict[str, Any] = {"share": 0.5, "generator_version": "v2"}
    else:
        from bench.ab_users import ensure_past_checkpoint
        from infra.settings import get_settings

        checkpoint = ensure_past_checkpoint(get_settings().cache_dir, args.past_share)
        treatment = {"share": 0.5, "generator": "ugt", "checkpoint": str(checkpoint)}
    return {"generator": "popularity", "default_domain": domain, "log_level": "warning", "impressions": True,
            "torch_compile": False, "experiments": {experiment: {"domains": [domain], "arms": {
                CONTROL: {"share": 0.5}, TREATMENT: treatment}}}}


def seed_arm_users(args: argparse.Namespace, settings: Any, run: str, domain: str) -> dict[str, frozenset[str]]:
    """The users' states in Feast and the popularity list; returns each user's held-out future (planted: none)."""
    ensure_feature_repo(settings)
    if args.mode == "planted":
        users = [f"absim-{run}-u{i}" for i in range(args.users)]
        seed_users(settings, domain, users, args.seed)
        return {u: frozenset() for u in users}
    from bench.ab_users import pick_users, seed_real_states

    sim_users = pick_users(args.users, args.past_share, run, args.seed)
    seed_real_states(settings, domain, sim_users, args.past_share)
    return {u.user_id: u.future for u in sim_users}


def run_traffic(args: argparse.Namespace, settings: Any, run: str) -> tuple[str, dict[str, Any], list[dict]]:
    """Seed, start the jobs and the service, drive the traffic, close the windows; returns (experiment, the
    simulation, the metric rows) with the click-to-metric delays in the simulation."""
    from bench.ab_join import MetricsWatcher, click_delays
    from bench.serving import start_server
    from jobs.cli import cancel
    from streams.producer import EventPublisher

    domain, experiment = f"absim-{run}", f"ab-{run}"
    futures = seed_arm_users(args, settings, run, domain)
    config = serving_config(args, domain, experiment)
    jids = start_jobs(run, settings, args)
    server = start_server("ab_sim", Path(tempfile.mkdtemp(prefix="ab_sim-")), dict(os.environ), config, workers=1)
    watcher = MetricsWatcher(settings, experiment)
    try:
        with EventPublisher(settings) as publisher:
            sim = simulate(args, server.port, domain, futures, publisher)
            time.sleep(3.0)  # the service's impression thread hands its last records to Kafka
            flushed_ms = int(time.time() * 1000)
            flushed = time.monotonic()
            flush_windows(settings, publisher, domain, min(min(f) for f in futures.values() if f))
        in_experiment = sum(v["impressions"] for k, v in sim["truth"].items() if k != "none")
        rows = wait_metrics(settings, experiment, in_experiment, args.timeout)
        sim["flush_to_metrics_s"] = round(time.monotonic() - flushed, 1)
        # while the service still runs: each arm's serving p99 and failures from its /metrics
        served = report_json(experiment, f"http://127.0.0.1:{server.port}")
        sim["serving"] = (served.get("serving") or {}).get("arms") or {}
    finally:
        first_seen = watcher.stop()
        server.stop()
        for jid in jids:
            cancel(settings.flink_rest_url, jid)
    sim["click_to_metric"] = click_delays(sim.pop("clicks"), first_seen, args.window_s * 1000, flushed_ms)
    return experiment, sim, rows


def conditions_of(args: argparse.Namespace) -> dict[str, Any]:
    from bench.ab_users import TINY_CONFIG

    arms = ("control: popularity-v1; treatment: popularity-v2" if args.mode == "planted" else
            f"control: popularity over the histories; treatment: UGT ({TINY_CONFIG}, trained on the histories only)")
    clicks = (f"planted: p {args.p_control} control, x{1 + args.lift} treatment" if args.mode == "planted" else
              f"cascade: examine 1/log2(i+2), click p_hit {args.p_hit} if in held-out future else p_base "
              f"{args.p_base}; history = first {args.past_share:.0%} of each ML-100K user's ratings")
    clicks += (f"; each click's VIEW: the whole {WATCH_LENGTH_S:.0f} s item with p {args.p_finish_hit} (an item of the "
               f"user's future) / {args.p_finish_base} (other), else 5-60 % of it")
    return {"mode": args.mode, "users": args.users, "rounds": args.rounds, "rate_req_s": args.rate, "k": args.k, "clicks": clicks,
            "buy": args.buy, "seed": args.seed, "shares": "50/50", "arms": arms, "window_s": args.window_s,
            "attribution_s": args.attribution_s, "out_of_orderness_s": args.out_of_orderness_s,
            "tokenize": "own job" if args.tokenize == "submit" else "the stack's running tokenize job",
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "path": "ugt serve (1 worker) -> events.impressions; clicks -> events.raw -> tokenize (Flink) -> "
                    "events.tokens; feedback_join (Flink, parallelism 1) -> Redis",
            "clock": "real time; windows close as live traffic moves the watermark; after the traffic one "
                     "impression and one event an hour later close the rest (their clicks are left out of the delay)"}


def main(argv: list[str] | None = None) -> int:
    from bench.ab_join import join_throughput
    from infra.settings import get_settings
    from streams.topics import ensure_pipeline

    args = parse_args(argv)
    settings = get_settings()
    run = args.run_id or uuid.uuid4().hex[:8]
    conditions = conditions_of(args)
    ensure_pipeline(settings)
    experiment, sim, rows = run_traffic(args, settings, run)
    results = readout(experiment, rows, sim, args)
    results.update({"requests": sim["requests"], "traffic_s": round(sim["traffic_s"], 1),
                    "requests_per_s": round(sim["requests"] / sim["traffic_s"], 1),
                    "flush_to_metrics_s": sim["flush_to_metrics_s"], "windows": len(rows),
                    "click_to_metric": sim["click_to_metric"]})
    if args.join_impressions:
        results["join_throughput"] = join_throughput(settings, run, args.join_impressions, args.seed, wait_running)
    conditions["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result(args.out, "ab_sim", conditions, results, argv, "python -m bench.ab_sim")
    print(f"the readout again (the metrics stay in Redis): {' '.join(report_command(experiment))}")
    for name, arm in results["arms"].items():
        print(f"{name}: {arm['impressions']} impressions, CTR {arm['ctr']:.4f} "
              f"[{arm['ctr_ci'][0]:.4f}, {arm['ctr_ci'][1]:.4f}], simulated {arm['simulated']}")
    print(f"lift {results['measured_lift']} {results['lift_ci']}, p {results['p_value']}, SRM p "
          f"{results['srm_p_value']}, exact {results['stream_equals_simulation']}")
    print(f"click to metric: {results['click_to_metric']}")
    print(f"join throughput: {results.get('join_throughput')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
