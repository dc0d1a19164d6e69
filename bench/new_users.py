"""Rapid adaptation: how well a user the model never trained on is served after their 1st, 3rd and 5th event.

A UGT (models/configs/ugt_ml100k_tiny.yaml, CPU) is trained without a held-out share of ML-100K's users (drawn
by id with a fixed seed; the vocabulary is the whole catalog, so their items are known). Each held-out user's
first n events are replayed through the real state path: tokenized as a RATE event (contracts.tokenizer), folded
by the user_state rule (contracts.user_state_rule, the job's own logic), written to Redis in Feast's layout
(bench/state_bytes.StateWriter, byte-equal to the job's writer), read back by serving's RedisStateReader and
answered by serving's UGTGenerator with the request time pinned to the target's time. The target is the user's
(n+1)-th event; ranking is over the full catalog with the user's history masked; HR@10 and NDCG@10.

Anchors in the same run, on the same states: ``popularity`` (the training users' event counts, history masked),
``similar`` (serving's similar-items source: faiss neighbours of the user's last items, models/similar built from
this checkpoint) and ``ugt+similar`` (serving's first-session merge, reciprocal rank of the two lists).

Declared interests (serving/interests.py, the request field ``interests``): the user's top 2 genres over their
first 5 events stand in for an onboarding form's answer (``@later`` rows: over their events from the 7th on, which
hold none of the targets). ``interests`` (after 0 events: no state) is serving's
popularity within them; ``ugt+interests`` is serving's bounded boost of UGT's top ``K * DEFAULT_POOL``
candidates (applied below interests.DEFAULT_MAX_EVENTS events, so after 5 it equals ``ugt``). For targets among
those first 5 events the declared genres include the target's by construction, as a truthful form's answer would.

Five held-out draws (seeds 0..4; one checkpoint each, trained up to 40 epochs with early stopping on the training
users' validation split) pool their users.

    python -m bench.new_users --redis-url redis://localhost:16390/0     # bench/results/new_users.json
    python -m bench.new_users --seeds 0 --holdout 0.05 --epochs 1 --max-users 20 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repo's packages importable
    sys.path.insert(0, str(REPO))
from bench.common import print_table, result_path, write_result  # noqa: E402
from serving.interests import DEFAULT_POOL  # noqa: E402

PROG = "python -m bench.new_users"
K = 10
DOMAIN = "movie"
SOURCES = ("ugt", "popularity", "similar", "ugt+similar", "interests", "ugt+interests", "interests@later",
           "ugt+interests@later")
KEY_PREFIX = {"ugt": "new_user", "popularity": "popularity_new_user", "similar": "similar_new_user",
              "ugt+similar": "ugt_similar_new_user", "interests": "interests_new_user",
              "ugt+interests": "ugt_interests_new_user", "interests@later": "interests_later_new_user",
              "ugt+interests@later": "ugt_interests_later_new_user"}
SOURCES_WITHOUT_STATE = ("popularity", "interests", "interests@later")  # after 0 events: no state to read
# The declared interests (an onboarding proxy): the top genres of the user's first 5 events ("first"), or of their
# events from the 7th on ("later": no target of the table, the 1st to 6th event, is among them)
INTEREST_EVENTS = 5
LATER_FROM = 6
INTEREST_GENRES = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="models/configs/ugt_ml100k_tiny.yaml", help="the UGT config trained")
    p.add_argument("--holdout", type=float, default=0.1, help="share of users held out of training (0..1)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list: one held-out draw (and one checkpoint) per seed, "
                   "the users of all pooled (training keeps its config seed)")
    p.add_argument("--epochs", type=int, default=40, help="max_epochs; early stopping on the training users' "
                   "validation split (the config's patience 3) picks the checkpoint, never the test split")
    p.add_argument("--after", default="0,1,3,5", help="comma list: events replayed before each target (0: no "
                   "state, popularity and declared interests only)")
    p.add_argument("--max-users", type=int, default=0, help="evaluate at most this many held-out users per seed "
                   "(0: all)")
    p.add_argument("--redis-url", default="", help="the Redis the states go through (default: the stack's, "
                   "UGT_REDIS_PORT)")
    p.add_argument("--work-dir", default="", help="where the checkpoints are trained, one folder per seed "
                   "(default: the cache, <cache>/bench/new-users; each reused when its recipe matches)")
    p.add_argument("--out", default=str(result_path("new_users")))
    return p.parse_args(argv)


# -- the checkpoint ------------------------------------------------------------------------------------
def split_users(data: Any, share: float, seed: int) -> tuple[Any, list[int]]:
    """(the data without the held-out users, the held-out users' row indices), drawn by user id with ``seed``."""
    if not 0 < share < 1:
        raise ValueError(f"--holdout must be between 0 and 1, got {share}")
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(data.num_users, size=max(1, round(share * data.num_users)), replace=False).tolist())
    keep = sorted(set(range(data.num_users)) - set(held))
    train = replace(data, user_ids=[data.user_ids[u] for u in keep], items=[data.items[u] for u in keep],
                    times=[data.times[u] for u in keep], ratings=[data.ratings[u] for u in keep])
    return train, held


def train_checkpoint(recipe: dict[str, Any], train: Any, work: Path) -> Path:
    """The checkpoint of ``recipe`` trained on ``train`` into ``work`` (reused when ``work`` holds that recipe's)."""
    from models.train import fit
    from models.train_config import load_config

    checkpoint, stamp = work / "checkpoint.pt", work / "recipe.json"
    if checkpoint.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        print(f"reusing {checkpoint}", file=sys.stderr)
        return checkpoint
    print(f"training {recipe['config']} without {recipe['held_out_users']} users into {work} ...", file=sys.stderr)
    cfg = load_config(str(REPO / recipe["config"]), {"out_dir": str(work), "progress": True, "device": "cpu",
                                                      "max_epochs": recipe["max_epochs"]})
    fit(cfg, data=train)
    stamp.write_text(json.dumps(recipe))
    return checkpoint


# -- the sources -------------------------------------------------------------------------------------
class Sources:
    """Each source's top-K item ids for a state read back from Redis (history masked)."""

    def __init__(self, checkpoint: Path, popularity: list[str], genres: dict[str, tuple[str, ...]]):
        from models.similar import ItemTables, SimilarIndex
        from serving.fallback import PopularityFallback
        from serving.generator import ScoredItem
        from serving.interests import InterestRanker
        from serving.similar import SimilarItems
        from serving.ugt_generator import UGTGenerator

        self.query_time = 0
        self.generator = UGTGenerator(checkpoint, clock=lambda: self.query_time, device="cpu")
        self.similar = SimilarItems(SimilarIndex.build(ItemTables.from_checkpoint(checkpoint)))
        self.popularity = popularity  # every catalog item, most events first
        ranked = [ScoredItem(item, float(len(popularity) - i)) for i, item in enumerate(popularity)]
        fallback = PopularityFallback(None, {DOMAIN: ranked}, cache_size=len(ranked))
        self.interests = InterestRanker(fallback, GenreCatalog(genres))

    def top(self, state: Any, interests: dict[str, list[str]]) -> dict[str, list[str]]:
        from serving.similar import merge_by_rank

        history = frozenset(state.item_ids)
        pool = self.generator.recommend(state, K * DEFAULT_POOL, frozenset(), domain=DOMAIN)
        ugt = pool[:K]
        similar = self.similar.candidates(state.item_ids, K, history)
        popular = [item for item in self.popularity[: K + len(history)] if item not in history][:K]
        fused = merge_by_rank(ugt, similar, K)
        out = {"ugt": [s.item_id for s in ugt], "popularity": popular,
               "similar": [s.item_id for s in similar], "ugt+similar": [s.item_id for s in fused]}
        for proxy, names in interests.items():
            shaped = self.interests.shaped(pool, names, len(state.item_ids))[:K]
            out["ugt+interests" + proxy] = [s.item_id for s in shaped]
        return out

    def top_without_state(self, interests: dict[str, list[str]]) -> dict[str, list[str]]:
        """After 0 events: overall popularity, and serving's popularity within the declared interests."""
        out = {"popularity": self.popularity[:K]}
        for proxy, names in interests.items():
            out["interests" + proxy] = [s.item_id for s in self.interests.popular_in(DOMAIN, names, K, frozenset())]
        return out


class GenreCatalog:
    """serving's CategorySource over the dataset's item genres (what Feast's item_metadata view holds)."""

    def __init__(self, genres: dict[str, tuple[str, ...]]):
        self.genres = genres

    def categories(self, item_ids: Any) -> dict[str, tuple[str, ...]]:
        return {item: self.genres.get(item, ()) for item in item_ids}


def item_genres(data: Any) -> dict[str, tuple[str, ...]]:
    """Item id -> its genre names, from the dataset's catalog."""
    names = {index: item for item, index in data.vocab.item_to_index.items()}
    return {names[i]: tuple(data.genre_names[g - 1] for g in row if g > 0)
            for i, row in enumerate(data.item_genres) if i in names}


def declared_interests(data: Any, u: int, genres: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """The two proxies, by source-name suffix: "" the user's top INTEREST_GENRES genres over their first
    INTEREST_EVENTS events, "@later" over their events from index LATER_FROM on (ties: by name)."""
    return {"": top_genres(data, u, genres, 0, INTEREST_EVENTS),
            "@later": top_genres(data, u, genres, LATER_FROM, len(data.items[u]))}


def top_genres(data: Any, u: int, genres: dict[str, tuple[str, ...]], start: int, end: int) -> list[str]:
    """User ``u``'s INTEREST_GENRES most frequent genres over their events ``start:end`` (ties: by name)."""
    names = {index: item for item, index in data.vocab.item_to_index.items()}
    counts: dict[str, int] = {}
    for index in data.items[u][start:end]:
        for genre in genres.get(names[int(index)], ()):
            counts[genre] = counts.get(genre, 0) + 1
    return sorted(counts, key=lambda g: (-counts[g], g))[:INTEREST_GENRES]


def popularity_order(train: Any) -> list[str]:
    """Catalog item ids by the training users' event counts (ties: vocabulary order)."""
    counts = np.zeros(train.num_items + 1, dtype=np.int64)
    for seq in train.items:
        np.add.at(counts, seq, 1)
    order = np.argsort(-counts[1:], kind="stable") + 1
    names = {index: item for item, index in train.vocab.item_to_index.items()}
    return [names[int(i)] for i in order]


# -- the replay ----------------------------------------------------------------------------------------
def user_events(data: Any, u: int, n: int) -> list[Any]:
    """User ``u``'s first ``n`` events as the tokenize job emits them for a RATE event."""
    from contracts.tokenizer import ACTION_TOKEN, TokenizedEvent, hour_token, weekday_token

    index_to_item = {index: item for item, index in data.vocab.item_to_index.items()}
    events = []
    for j in range(n):
        ms = int(data.times[u][j]) * 1000
        events.append(TokenizedEvent(
            event_id=f"{data.user_ids[u]}-{j:05d}", user_id=f"newuser-{data.user_ids[u]}",
            item_id=index_to_item[int(data.items[u][j])], event_time=ms, domain=DOMAIN,
            action_token=ACTION_TOKEN["RATE"], rating_token=int(data.ratings[u][j]), duration_token=0,
            hour_token=hour_token(ms), weekday_token=weekday_token(ms)))
    return events


def sources_at(n: int) -> tuple[str, ...]:
    """The sources measured after ``n`` events."""
    return SOURCES_WITHOUT_STATE if n == 0 else tuple(s for s in SOURCES if not s.startswith("interests"))


def add_hit(sums: dict[tuple[str, int], list[float]], name: str, n: int, top: list[str], target: str) -> None:
    """Count one answer: a hit and its NDCG gain when ``target`` is in ``top``."""
    row = sums.setdefault((name, n), [0.0, 0.0])
    if target in top:
        row[0] += 1.0
        row[1] += 1.0 / math.log2(top.index(target) + 2)


def replay(data: Any, held: list[int], after: list[int], sources: Sources, client: Any) -> dict[str, Any]:
    """Hits and NDCG sums per (source, n) over the held-out users, and how many users each n counted."""
    from bench.state_bytes import FEATURE_VIEW, StateWriter
    from contracts.user_state_rule import states_from_events
    from infra.feast_store import FeastRedisLayout
    from serving.user_state_reader import RedisStateReader

    layout = FeastRedisLayout("ugt")
    writer, reader = StateWriter(client, layout), RedisStateReader(client, layout, FEATURE_VIEW)
    index_to_item = {index: item for item, index in data.vocab.item_to_index.items()}
    genres = sources.interests.catalog.genres  # type: ignore[attr-defined]
    sums: dict[tuple[str, int], list[float]] = {}
    users = dict.fromkeys(after, 0)
    written = []
    for u in tqdm(held, desc="held-out users", unit="user"):
        interests = declared_interests(data, u, genres)
        for n in after:
            if len(data.items[u]) <= n:
                continue  # no (n+1)-th event to predict
            target = index_to_item[int(data.items[u][n])]
            users[n] += 1
            if n == 0:  # no state to write: what a request with no history gets
                for name, top in sources.top_without_state(interests).items():
                    add_hit(sums, name, n, top, target)
                continue
            state = states_from_events(user_events(data, u, n))[f"newuser-{data.user_ids[u]}"]
            writer.write([state.to_feature_row()])
            written.append(state.user_id)
            view = reader.read(state.user_id)
            assert view is not None and len(view.item_ids) == n, f"state of {state.user_id} did not round-trip"
            sources.query_time = int(data.times[u][n])  # the request comes at the target's time
            for name, top in sources.top(view, interests).items():
                add_hit(sums, name, n, top, target)
    if written:
        client.delete(*{layout.entity_key("user_id", w) for w in written})
    return {"sums": sums, "users": users}


def rates(sums: dict[tuple[str, int], list[float]], users: dict[int, int]) -> dict[str, float]:
    """``<source>_hr@10_after_<n>`` / ``..._ndcg@10_after_<n>``: the sums over the users counted at n."""
    out: dict[str, float] = {}
    for (name, n), (hits, gain) in sums.items():
        count = users[n]
        out[f"{KEY_PREFIX[name]}_hr@{K}_after_{n}"] = round(hits / count, 4) if count else float("nan")
        out[f"{KEY_PREFIX[name]}_ndcg@{K}_after_{n}"] = round(gain / count, 4) if count else float("nan")
    return out


def run_seed(args: argparse.Namespace, cfg: Any, data: Any, seed: int, after: list[int],
             client: Any) -> dict[str, Any]:
    """One held-out draw: its checkpoint (trained or reused), then the replay of its users."""
    from infra.settings import get_settings

    train, held = split_users(data, args.holdout, seed)
    recipe = {"config": args.config, "dataset": cfg.dataset, "max_epochs": args.epochs, "holdout": args.holdout,
              "holdout_seed": seed, "train_seed": cfg.seed, "train_users": train.num_users,
              "held_out_users": len(held), "device": "cpu"}
    root = Path(args.work_dir) if args.work_dir else get_settings().cache_dir / "bench" / "new-users"
    work = root / f"{Path(args.config).stem}-h{args.holdout}-s{seed}-e{args.epochs}"
    checkpoint = train_checkpoint(recipe, train, work)
    evaluated = held[: args.max_users] if args.max_users > 0 else held
    sources = Sources(checkpoint, popularity_order(train), item_genres(data))
    found = replay(data, evaluated, after, sources, client)
    summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").is_file() else {}
    test = summary.get("test", {})
    recipe.update(evaluated_users=len(evaluated), checkpoint_best_epoch=summary.get("best_epoch"),
                  checkpoint_test_hr10_train_users=test.get("hr@10"))
    return {"recipe": recipe, **found}


def main(argv: list[str] | None = None) -> int:
    import redis

    from contracts.datasets import load_dataset
    from infra.settings import get_settings
    from models.data import build_sequences
    from models.train_config import load_config

    args = parse_args(argv)
    after = sorted({int(x) for x in args.after.split(",") if x.strip()})
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not after or after[0] < 0 or not seeds:
        raise SystemExit("--after: a comma list of event counts >= 0; --seeds: a comma list of integers")
    cfg = load_config(str(REPO / args.config))
    data = build_sequences(load_dataset(cfg.dataset), cfg.tie_order)
    url = args.redis_url or f"redis://localhost:{get_settings().redis_port}/0"
    client = redis.Redis.from_url(url, socket_timeout=10)
    client.ping()
    runs = [run_seed(args, cfg, data, seed, after, client) for seed in seeds]
    sums = {key: [sum(r["sums"][key][i] for r in runs) for i in (0, 1)] for key in runs[0]["sums"]}
    nan = float("nan")
    users = {n: sum(r["users"][n] for r in runs) for n in after}
    results: dict[str, Any] = rates(sums, users)
    results.update(users={str(n): c for n, c in users.items()}, catalog_items=data.num_items,
                   per_seed={str(seed): rates(r["sums"], r["users"]) for seed, r in zip(seeds, runs, strict=True)})
    print_table([{"source": s, **{f"hr@{K} after {n}": results.get(f"{KEY_PREFIX[s]}_hr@{K}_after_{n}", nan)
                                  for n in after},
                  **{f"ndcg@{K} after {n}": results.get(f"{KEY_PREFIX[s]}_ndcg@{K}_after_{n}", nan) for n in after}}
                 for s in SOURCES])
    conditions = {"recipes": [r["recipe"] for r in runs], "seeds": seeds, "after_events": after, "k": K,
                  "ranking": "full catalog, the user's history masked", "target": "the (n+1)-th event",
                  "path": "tokenized RATE events -> user_state rule -> StateWriter (Feast layout) -> Redis -> "
                          "RedisStateReader -> UGTGenerator (CPU)",
                  "popularity": "training users' event counts", "similar": "faiss HNSW over the checkpoint's "
                  "item vectors (models/similar), neighbours of the last 3 items", "ugt+similar": "RRF of both lists",
                  "interests": f"declared interests proxy: the user's top {INTEREST_GENRES} genres over their first "
                  f"{INTEREST_EVENTS} events (stands in for an onboarding form); serving.interests popular_in "
                  "(after 0 events)", "interests@later": f"the same with the top {INTEREST_GENRES} genres over "
                  f"the user's events from the {LATER_FROM + 1}th on (none of the targets)", "ugt+interests": f"serving.interests boost of UGT's top {K * DEFAULT_POOL} "
                  "(below DEFAULT_MAX_EVENTS events)"}
    write_result(args.out, "new_users", conditions, results, argv, PROG if argv is not None else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
