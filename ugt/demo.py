"""`ugt demo`: the main job end to end, the way a user would run it by hand.

stack up -> feast apply -> fetch ML-1M -> build (or reuse) the semantic-ID artifact -> submit the Flink jobs
(tokenize, user_state, item_semantic_ids) -> publish the catalog and a few brand-new items, wait until they are
indexed (prints the new-item delay) -> replay events into Kafka -> wait until the user_state job has applied
them -> retrain a small UGT on the parquet lake the tokenize job wrote (`ugt train --lake`) and build its
similar-items index -> start /recommend with both -> query a few users -> publish one more movie and time it until
/recommend can answer with it; its similar items and a known movie's -> a short A/B (popularity vs a small UGT,
simulated users) read out by `ugt experiment report` -> print. Each step runs the same `ugt` / `feast` command the
README shows, so the demo proves those commands.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from infra.settings import REPO_ROOT, get_settings
from ugt.demo_steps import build_similar_index, known_item, run_ab, show_similar

if TYPE_CHECKING:
    from contracts.datasets import Dataset

BIN = Path(sys.executable).parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-1m", choices=("ml-1m", "ml-100k"), help="dataset to replay")
    parser.add_argument("--limit", type=int, default=100_000,
                        help="user events to replay, in event-time order (default: %(default)s; 0 = all)")
    parser.add_argument("--users", type=int, default=5, help="users to query /recommend for (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="items per answer (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=900.0,
                        help="how long to wait for the jobs to apply every event (default: %(default)s)")
    parser.add_argument("--keep-serving", action="store_true", help="leave `ugt serve` running at the end")
    parser.add_argument("--model", default="ugt", choices=("ugt", "popularity"),
                        help="what /recommend serves: ugt = retrain the demo's small UGT on the lake the stream "
                             "wrote, then serve it; popularity = the default config (default: %(default)s)")
    parser.add_argument("--ab-users", type=int, default=400,
                        help="simulated users of the closing A/B (2 requests each, ~2-3 min in all); 0 skips it "
                             "(default: %(default)s)")


DEMO_MODEL_CONFIG = "models/configs/ugt_ml1m_demo.yaml"
SID_CONFIG = {"ml-1m": ("models/configs/semantic_ids_ml1m.yaml", "runs/sid/ml1m"),
              "ml-100k": ("models/configs/semantic_ids_ml100k.yaml", "runs/sid/ml100k")}
NEW_ITEMS = [  # movies after ML-1M's time: brand-new to the artifact, so they take the item job's whole path
    {"item_id": "demo-new-interstellar", "title": "Interstellar", "year": "2014",
     "categories": ["Adventure", "Drama", "Sci-Fi"]},
    {"item_id": "demo-new-inside-out", "title": "Inside Out", "year": "2015",
     "categories": ["Animation", "Children's", "Comedy"]},
    {"item_id": "demo-new-mad-max-fury-road", "title": "Mad Max: Fury Road", "year": "2015",
     "categories": ["Action", "Adventure", "Sci-Fi"]},
]

LATE_ITEM = {"item_id": "demo-late-dune-part-two", "title": "Dune: Part Two", "year": "2024",
             "categories": ["Adventure", "Drama", "Sci-Fi"]}  # published at step 11, while /recommend runs


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(*cmd: str) -> None:
    """Run a command as the user would, streaming its output; stop the demo if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(list(cmd), cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit code {result.returncode}; see its output above")


def events_taken() -> int:
    """Events the running user_state job has taken (its `ugt.events` counter, summed over subtasks).

    Not the popularity sums: those count each event identity once across job runs (exactly-once effect), so
    a second demo run over the same Redis replays events that are already counted there.
    """
    from jobs.cli import operator_counter

    return operator_counter(get_settings().flink_rest_url, "user_state", "user-state", "events")


def state_reader(redis_client):
    """The users' online state read as serving reads it (Feast's Redis rows, the default serving config's view)."""
    from infra.feast_store import FeastRedisLayout
    from serving.config import ServingConfig
    from serving.user_state_reader import RedisStateReader

    layout = FeastRedisLayout.from_repo(get_settings().feature_repo)
    return RedisStateReader(redis_client, layout, ServingConfig().feature_view)


def stop_if_a_job_fails() -> None:
    """A UGT job stuck restarting would make the demo wait for nothing: stop with its cause instead."""
    from jobs.cli import SUBMITTABLE, failure_cause, list_jobs

    base = get_settings().flink_rest_url
    for job in list_jobs(base):  # FAILED jobs may be history; a running one stuck restarting is this demo's
        if job["name"] in SUBMITTABLE and job["state"] in ("FAILING", "RESTARTING"):
            cause = failure_cause(base, job["jid"])
            if cause:
                raise SystemExit(f"demo: Flink job {job['name']} ({job['jid']}) is {cause}; see var/log/flink/ "
                                 "(after changing job code in thread mode, restart the TaskManager: docs/JOBS.md)")


def wait_until_applied(redis_client, before: int, count: int, last_event: tuple[str, int],
                       timeout_s: float) -> float:
    """Poll until the user_state job has taken `count` more events than `before` and the last one's user
    state is in Redis; returns the seconds waited."""
    from tqdm import tqdm

    def check_timeout(what: str) -> None:
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"demo: {what} after {timeout_s:.0f} s; check `ugt jobs list` and var/log/flink/")

    start = time.monotonic()
    done = events_taken() - before
    with tqdm(total=count, initial=min(done, count), desc="applied by Flink", unit="ev", unit_scale=True) as bar:
        while done < count:
            check_timeout(f"only {done:,} of {count:,} events taken by user_state")
            time.sleep(1.0)
            stop_if_a_job_fails()
            now = events_taken() - before
            bar.update(min(now, count) - min(done, count))
            done = now
    user_id, event_time_ms = last_event
    reader = state_reader(redis_client)
    while (view := reader.read(user_id)) is None or view.last_event_time < event_time_ms:  # writes are batched
        check_timeout(f"user {user_id}'s state in Redis still lacks the last replayed event")
        time.sleep(0.2)
    return time.monotonic() - start


def wait_for_lake(lake: Path, events: int, timeout_s: float) -> None:
    """Parquet files commit on the tokenize job's checkpoints: wait until the lake holds the replayed events."""
    from jobs.lake import read_lake

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            held = len(read_lake(lake))
        except FileNotFoundError:
            held = 0
        if held >= events:
            print(f"the lake holds {held:,} distinct events (files commit on checkpoints)")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: the lake {lake} holds {held:,} of {events:,} events after {timeout_s:.0f} s; "
                             "is the tokenize job checkpointing? (`ugt jobs list`, var/log/flink/)")
        time.sleep(2.0)


def write_serving_config(folder: Path, checkpoint: Path, similar_index: Path | None = None) -> Path:
    """serving/configs/default.yaml with the UGT generator on the given checkpoint (and GET /similar on the index)."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "serving" / "configs" / "default.yaml").read_text())
    config.update(generator="ugt", checkpoint=str(checkpoint))
    if similar_index is not None:
        config.update(similar_index=str(similar_index))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "serving.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ensure_artifact(dataset: str) -> Path:
    """The dataset's semantic-ID artifact: reused when it loads (checksum verified), else built (minutes)."""
    from models.semantic_ids.artifact import ArtifactError, SemanticIdArtifact

    config, out = SID_CONFIG[dataset]
    folder = REPO_ROOT / out
    try:
        artifact = SemanticIdArtifact.load(folder)
        print(f"reusing {out} ({len(artifact.item_ids):,} items, codebook sizes {artifact.codebook_sizes}); "
              f"delete it to rebuild")
    except ArtifactError as exc:
        print(f"no usable artifact in {out} ({exc}); building it (about 5 minutes on 2 cores, text embeddings cached)")
        sh(str(BIN / "ugt"), "semantic-ids", "build", "--dataset", dataset, "--config", config, "--out", out)
    return folder


def wait_items_indexed(redis_client, catalog: list[str], new: list[str], published_at: float,
                       timeout_s: float) -> tuple[str, dict[str, float]]:
    """Wait until the brand-new items decode from the active version's index and every catalog item has its
    Feast item_metadata row; returns (version, seconds from publish to decodable per new item)."""
    from contracts.redis_keys import active_version, item_key
    from infra.feast_store import open_feature_store

    deadline = time.monotonic() + timeout_s
    seen: dict[str, float] = {}
    version = None
    while len(seen) < len(new):
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: new items not indexed after {timeout_s:.0f} s (version {version}); "
                             "check `ugt jobs list` and var/log/flink/")
        version = active_version(redis_client)
        if version:
            for item_id, code in zip(new, redis_client.hmget(item_key(version), new), strict=True):
                if code is not None and item_id not in seen:
                    seen[item_id] = time.time() - published_at
        time.sleep(0.05)
    store = open_feature_store(get_settings())
    while True:
        rows = store.get_online_features(features=["item_metadata:semantic_ids"],
                                         entity_rows=[{"item_id": i} for i in catalog]).to_dict()["semantic_ids"]
        missing = sum(1 for r in rows if not r)
        if not missing:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {missing:,} catalog items still lack Feast item_metadata after {timeout_s:.0f} s")
        time.sleep(1.0)
    return str(version), seen


def live_items_served(base: str, user: str) -> tuple[float, str]:
    """(new items the served model answers with, its state line) from /metrics, after one request (the engine
    applies what its feed thread accepted before each batch)."""
    import re

    import requests

    requests.post(f"{base}/recommend", json={"user_id": user, "k": 1}, timeout=10)
    text = requests.get(f"{base}/metrics", timeout=10).text
    rows = re.findall(r'^ugt_serving_live_items\{(.*)\} (\S+)$', text, flags=re.M)
    return sum(float(v) for _, v in rows), "; ".join(labels for labels, _ in rows)


def show_live_items(base: str, user: str, title_of: dict, timeout_s: float) -> dict:
    """Publish LATE_ITEM now and time it until /recommend can answer with it; show where the new movies rank.
    Returns the movie as published (its id is new on every run)."""
    import requests

    from streams.producer import EventPublisher

    movie = {**LATE_ITEM, "item_id": f"{LATE_ITEM['item_id']}-{int(time.time())}"}  # new on every demo run
    before, labels = live_items_served(base, user)
    print(f"new items the model serves without a retrain: {before:.0f} ({labels})")
    with EventPublisher(get_settings()) as publisher:
        publisher.publish_item_event({
            "item_id": movie["item_id"], "domain": "movie", "title": movie["title"], "description": "",
            "categories": movie["categories"], "attributes": {"year": movie["year"]},
            "updated_at": int(time.time() * 1000)})
    published = time.time()
    deadline = time.monotonic() + timeout_s
    while live_items_served(base, user)[0] < before + 1:
        if time.monotonic() > deadline:
            print(f"{movie['title']} is not served after {timeout_s:.0f} s: see `ugt jobs list`, var/log/flink/ and "
                  "the serve log above")
            break
        time.sleep(0.05)
    else:
        print(f"{movie['title']!r} servable by /recommend {time.time() - published:.2f} s after its catalog event "
              "(item job batch + semantic ID + feed + generator)")
    answer = requests.post(f"{base}/recommend", json={"user_id": user, "k": 1000}, timeout=10).json()
    ranks = {i["item_id"]: n for n, i in enumerate(answer.get("items", []), 1)}
    for new in [*NEW_ITEMS, movie]:
        where = f"#{ranks[new['item_id']]}" if new["item_id"] in ranks else "not in the top 1000"
        print(f"  {new['title']!r:24} in user {user}'s ranking: {where} (no ID row: scored by its semantic ID, "
              "genres and year)")
    return movie


def submit_jobs(ugt: str, artifact: Path) -> None:
    """Submit the Flink jobs that are not running yet (a second demo run must not start them twice)."""
    from jobs.cli import ITEM_JOB, JOBS, list_jobs

    running = {j["name"] for j in list_jobs(get_settings().flink_rest_url) if j["state"] == "RUNNING"}
    for job in (*JOBS, ITEM_JOB):
        if job in running:
            print(f"{job} is already running (`ugt jobs list`): not submitting it twice")
        elif job == ITEM_JOB:
            sh(ugt, "jobs", "submit", "--detached", job, "--", "--artifact", str(artifact.relative_to(REPO_ROOT)))
        else:
            sh(ugt, "jobs", "submit", "--detached", job)


def publish_items(ugt: str, dataset_name: str, redis_client, timeout_s: float) -> Dataset:
    """Publish the catalog and NEW_ITEMS, wait until they are indexed and print each new item's delay;
    returns the loaded dataset (its ratings are replayed next)."""
    from contracts.datasets import load_dataset
    from contracts.redis_keys import item_key
    from streams.producer import EventPublisher

    sh(ugt, "publish", "replay", dataset_name, "--items", "--limit", "0")
    dataset = load_dataset(dataset_name)
    with EventPublisher(get_settings()) as publisher:
        for movie in NEW_ITEMS:
            publisher.publish_item_event({
                "item_id": movie["item_id"], "domain": "movie", "title": movie["title"], "description": "",
                "categories": movie["categories"], "attributes": {"year": movie["year"]},
                "updated_at": int(time.time() * 1000)})
    published_at = time.time()
    new_ids = [m["item_id"] for m in NEW_ITEMS]
    version, delays = wait_items_indexed(redis_client, [str(i) for i in dataset.items["item_id"]], new_ids,
                                         published_at, timeout_s)
    for movie in NEW_ITEMS:
        code = redis_client.hget(item_key(version), movie["item_id"]).decode()
        print(f"  new item {movie['title']!r:24} -> semantic ID {code}  decodable {delays[movie['item_id']]:.2f} s "
              "after publish")
    print(f"new-item delay (publish -> decodable by the generator index, version {version}): "
          f"max {max(delays.values()):.2f} s (the first new item also pays the text encoder's load; a new item "
          "already indexed by an earlier demo run shows ~0)")
    return dataset


def retrain_on_lake(ugt: str, artifact: Path, events: int, timeout_s: float) -> Path:
    """Train the demo's small UGT on the tokenize job's parquet lake and index its items for GET /similar; returns
    the serving config that serves both."""
    settings = get_settings()
    lake = settings.var_dir / "lake" / "events_tokens"
    wait_for_lake(lake, events, timeout_s)
    out_dir = REPO_ROOT / "runs" / "ugt-ml1m-demo"
    # the item job's artifact: the model embeds items by semantic ID too, so it can serve items coded later
    sh(ugt, "train", "--config", DEMO_MODEL_CONFIG, "--lake", str(lake), "--out-dir", str(out_dir), "--device", "cpu",
       "--set", f"semantic_ids={{artifact: {artifact}}}")
    similar = build_similar_index(ugt, out_dir / "checkpoint.pt", sh)
    return write_serving_config(settings.var_dir / "demo", out_dir / "checkpoint.pt", similar)


def wait_until_serving(server: subprocess.Popen, base: str) -> None:
    """Wait for /health; start-up includes torch.compile of the model steps (torch_compile)."""
    import requests

    deadline = time.monotonic() + 600
    while True:
        try:
            if requests.get(f"{base}/health", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("demo: `ugt serve` did not become healthy in 600 s; see its output above "
                             "(UGT_SERVING_TORCH_COMPILE=false skips the start-up compile)")
        time.sleep(0.5)


def query_users(base: str, users: list[str], k: int, title_of: dict[str, str]) -> None:
    """Print each user's answer as titles, then the first user's full JSON answer."""
    import requests

    for user in users:
        answer = requests.post(f"{base}/recommend", json={"user_id": user, "k": k}, timeout=10).json()
        titles = "; ".join(title_of.get(i["item_id"], i["item_id"]) for i in answer.get("items", []))
        print(f"user {user:>12}  fallback={answer.get('fallback')!s:5}  model={answer.get('model')}\n    {titles}")
    print("\nfull answer for the first user:")
    print(json.dumps(requests.post(f"{base}/recommend", json={"user_id": users[0], "k": 3}, timeout=10).json(),
                     indent=2))


def serve_and_query(serve: list[str], args: argparse.Namespace, users: list[str], title_of: dict[str, str]) -> None:
    """Start `ugt serve`, query it and (UGT model) time a movie published meanwhile; stop it unless --keep-serving."""
    server = subprocess.Popen(serve, cwd=REPO_ROOT)
    base = f"http://localhost:{get_settings().serving_port}"
    try:
        wait_until_serving(server, base)
        query_users(base, users, args.k, title_of)
        if args.model == "ugt":
            step("11. a movie published while /recommend runs: item job -> semantic ID -> feed -> the generator")
            movie = show_live_items(base, users[0], title_of, args.timeout_s)
            step("12. similar items (GET /similar/{item_id}): the new movie, from its content alone, and a known one")
            top = requests_top_item(base, users[0])
            titles = {**title_of, **{m["item_id"]: m["title"] for m in NEW_ITEMS}, movie["item_id"]: movie["title"]}
            known = known_item(title_of, top)
            show_similar(base, [(movie["item_id"], movie["title"]), (known, titles.get(known, known))], titles)
    finally:
        if not args.keep_serving:
            server.terminate()
            server.wait(timeout=30)


def requests_top_item(base: str, user: str) -> str:
    """The first item /recommend answers the user with (the known movie when the catalog lacks KNOWN_TITLE)."""
    import requests

    items = requests.post(f"{base}/recommend", json={"user_id": user, "k": 1}, timeout=10).json().get("items", [])
    return items[0]["item_id"] if items else ""


def run(args: argparse.Namespace) -> int:
    from infra.redis_client import redis_client

    settings = get_settings()
    ugt = str(BIN / "ugt")

    step("1. local stack: Kafka (KRaft), Schema Registry, Redis, Flink")
    sh(ugt, "stack", "up")

    step("2. Feast repo: register entities and feature views")
    sh(str(BIN / "feast"), "-c", "feature_repo", "apply")

    step(f"3. fetch {args.dataset} and convert it to UGT events")
    sh(ugt, "data", "fetch", args.dataset)

    r = redis_client(settings)

    step(f"4. semantic IDs for {args.dataset}: build or reuse the artifact")
    artifact = ensure_artifact(args.dataset)

    step("5. submit the Flink jobs (tokenize, user_state, item_semantic_ids) to the standalone cluster")
    submit_jobs(ugt, artifact)

    step("6. publish the item catalog and 3 brand-new movies; wait until the item job has indexed them")
    dataset = publish_items(ugt, args.dataset, r, args.timeout_s)

    step("7. replay user events into Kafka in event-time order")
    before = events_taken()  # 0 when this demo just submitted user_state
    replay = [ugt, "publish", "replay", args.dataset]
    if args.limit:
        replay += ["--limit", str(args.limit)]
    sh(*replay)
    ratings = dataset.ratings
    title_of = dict(zip(dataset.items["item_id"], dataset.items["title"], strict=True))
    published = len(ratings) if not args.limit else min(args.limit, len(ratings))

    step("8. wait until every event is in the users' state (Redis, through Feast)")
    ordered = ratings.sort_values(["timestamp", "row"], kind="stable").head(published)
    last = ordered.iloc[-1]
    took = wait_until_applied(r, before, published, (str(last["user_id"]), int(last["timestamp"]) * 1000),
                              args.timeout_s)
    print(f"{published:,} events applied {took:.1f} s after the replay finished")

    serve = [ugt, "serve", "--port", str(settings.serving_port)]
    if args.model == "ugt":
        step("9. retrain UGT on what the stream wrote: the tokenize job's parquet lake")
        serve += ["--config", str(retrain_on_lake(ugt, artifact, published, args.timeout_s))]

    step("10. serve /recommend and query it")
    users = list(ordered["user_id"].value_counts().index[: args.users]) + ["no-such-user"]
    serve_and_query(serve, args, users, title_of)
    if args.ab_users > 0:
        step("13. a short A/B: popularity vs a small UGT, simulated users, joined by feedback_join, read out")
        run_ab(ugt, args.ab_users, sh)
    print("\nDone. The stack and the Flink jobs keep running: `ugt jobs list`, `ugt stack status`, `ugt stack down`.")
    return 0
