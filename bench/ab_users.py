"""Real ML-100K users for the A/B simulator (bench/ab_sim.py): their past in Feast, their future held out.

Each user's ratings in time order are cut at ``past_share``: the first part is their history (pushed through
Feast as their state, and the only part the UGT checkpoint trains on), the rest is their held-out future, what the
simulated user will click when it is shown to them. The checkpoint is ugt_ml100k_tiny trained (its config, CPU,
cached) on the histories alone, so no arm has seen a user's future; the popularity list is counted over the same
histories.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO

TINY_CONFIG = "models/configs/ugt_ml100k_tiny.yaml"


@dataclass
class SimUser:
    """One ML-100K user: the ids they are served under, their past (item ids, ratings) and their future."""

    user_id: str
    source_id: str
    past: list[tuple[str, float, int]]  # (item id, rating, epoch seconds), time order
    future: frozenset[str]


def split_users(past_share: float) -> tuple[dict[str, list[tuple[str, float, int]]], dict[str, frozenset[str]]]:
    """ML-100K cut per user at ``past_share`` of their ratings in time order (ties in file order)."""
    from contracts.datasets import load_dataset

    ratings = load_dataset("ml-100k").ratings.sort_values(["user_id", "timestamp", "row"], kind="stable")
    past: dict[str, list[tuple[str, float, int]]] = {}
    future: dict[str, frozenset[str]] = {}
    for user, rows in ratings.groupby("user_id", sort=False):
        events = list(zip(rows["item_id"], rows["rating"], rows["timestamp"], strict=True))
        cut = max(1, int(len(events) * past_share))
        past[str(user)] = [(str(i), float(r), int(t)) for i, r, t in events[:cut]]
        future[str(user)] = frozenset(str(i) for i, _, _ in events[cut:])
    return past, future


def write_past_dataset(past: dict[str, list[tuple[str, float, int]]], folder: Path) -> Path:
    """The histories as a generic dataset folder (contracts.datasets.load_generic), what the checkpoint trains on."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id,item_id,timestamp,rating"]
    lines += [f"{user},{item},{ts},{rating}" for user, events in past.items() for item, rating, ts in events]
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n")
    return folder


def ensure_past_checkpoint(cache_dir: Path, past_share: float) -> Path:
    """ugt_ml100k_tiny trained as its config says (8 epochs at most, CPU, ~2 min) on the histories only, cached per
    ``past_share``."""
    out = cache_dir / "bench" / f"ugt-ml100k-tiny-past{round(past_share * 100)}-full"
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        return checkpoint
    from models.train import fit
    from models.train_config import load_config

    past, _ = split_users(past_share)
    folder = write_past_dataset(past, out / "dataset")
    print(f"training the small model on the histories once into {out} ...", file=sys.stderr)
    cfg = load_config(str(REPO / TINY_CONFIG), {"out_dir": str(out), "progress": True, "device": "cpu",
                                                 "dataset": str(folder)})
    fit(cfg)
    return checkpoint


def pick_users(count: int, past_share: float, run: str, seed: int) -> list[SimUser]:
    """``count`` ML-100K users (seeded choice) with a non-empty future, renamed for this run."""
    import random

    past, future = split_users(past_share)
    ids = sorted((u for u in past if future[u]), key=int)
    chosen = sorted(random.Random(seed).sample(ids, min(count, len(ids))), key=int)
    return [SimUser(f"absim-{run}-u{u}", u, past[u], future[u]) for u in chosen]


def seed_real_states(settings: Any, domain: str, users: list[SimUser], past_share: float) -> dict[str, float]:
    """Push each user's history through Feast as their state (event times moved to end a day ago, gaps kept), and
    the domain's popularity list counted over every history; returns that list."""
    import pandas as pd
    import redis
    from feast.data_source import PushMode

    from contracts.tokenizer import TokenizedEvent, hour_token, rating_token
    from contracts.user_state_rule import states_from_events
    from infra.feast_store import open_feature_store

    end_ms = int(time.time() * 1000) - 86_400_000
    events = []
    for user in users:
        shift = end_ms - user.past[-1][2] * 1000
        for n, (item, rating, ts) in enumerate(user.past):
            at = ts * 1000 + shift
            events.append(TokenizedEvent(event_id=f"{user.user_id}-h{n}", user_id=user.user_id, item_id=item,
                                         event_time=at, domain=domain, action_token=2,
                                         rating_token=rating_token(rating), duration_token=0,
                                         hour_token=hour_token(at)))
    frame = pd.DataFrame([s.to_feature_row() for s in states_from_events(events).values()])
    frame["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    open_feature_store(settings).push("user_recent_events_push", frame, to=PushMode.ONLINE)
    past, _ = split_users(past_share)
    counts: dict[str, float] = {}
    for events_of_user in past.values():
        for item, _, _ in events_of_user:
            counts[item] = counts.get(item, 0.0) + 1.0
    redis.Redis.from_url(settings.redis_url).zadd(f"ugt:popularity:{domain}", counts)
    return counts
