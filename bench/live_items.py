"""New items served without a retrain: delay from the item job's feed to the generator serving the item.

One run, a private redis-server on a free port (the shared stack is not touched):

* **anchor** -- the feed alone: ``XADD`` on a stream, a reader blocked in ``XREAD`` receives it (the floor of any
  consumer of the item job's feed);
* **live catalog** -- a tiny UGT with semantic IDs (ML-100K, synthetic codes, one epoch) served by
  ``UGTGenerator(live_items=...)`` while a loop sends it requests back to back, as a busy server would; new items
  are announced with the item job's own writer (``RedisSidIndex.write_new``) and timed until ``recommend_batch``
  can answer with them (feed thread: XREAD, checks, the trie grown in place; inference thread: rows and trie edits
  written in place).

Both at the same steady rate. Also the prefix trie at the catalog sizes given: a rebuild (what the feed thread did per
batch of new items before) beside adding 100 items to a trie with spare rows, in place (what it does now). Absolute times are this box's;
compare the rows of one run.

    python -m bench.live_items                      # table + bench/results/live_items.json
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import write_result
from bench.ml1m_quality import device_name

SIZES = [8, 8, 64]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200, help="new items announced (default: %(default)s)")
    p.add_argument("--rate", type=float, default=20.0, help="announcements per second (default: %(default)s)")
    p.add_argument("--trie-sizes", default="3883,100000,1000000", help="catalog sizes for the trie rows (rebuild vs add 100 in place)")
    p.add_argument("--out", default="bench/results/live_items.json")
    return p.parse_args(argv)


def private_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(300):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start (is it installed? bash infra/install.sh)")


def percentiles(delays: list[float]) -> dict[str, float]:
    a = np.asarray(delays) * 1000
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2)}


def anchor_delays(port: int, n: int, rate: float) -> list[float]:
    """XADD -> a reader blocked in XREAD receives it."""
    import redis

    writer, reader = redis.Redis(port=port), redis.Redis(port=port, socket_timeout=5)
    sent: dict[str, float] = {}
    got: list[float] = []

    def read() -> None:
        last = "0-0"
        while len(got) < n:
            for _, entries in reader.xread({"bench:anchor": last}, block=1000) or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    got.append(time.perf_counter() - sent[fields[b"i"].decode()])

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    time.sleep(0.2)
    for i in range(n):
        sent[str(i)] = time.perf_counter()
        writer.xadd("bench:anchor", {"i": str(i)})
        time.sleep(1 / rate)
    thread.join(30)
    return got


def tiny_checkpoint(folder: Path) -> Path:
    from contracts.datasets import load_dataset
    from models.train import fit
    from models.train_config import load_config

    items = [str(i) for i in load_dataset("ml-100k").items["item_id"]]
    order = np.random.default_rng(0).permutation(len(items))
    codes = np.stack([order % 8, (order // 8) % 8, order // 64], 1)
    np.savez(folder / "sid.npz", codes=codes, item_ids=np.asarray(items), codebook_sizes=np.asarray(SIZES))
    fit(load_config("models/configs/ugt_ml100k_tiny.yaml", {
        "out_dir": str(folder), "progress": False, "device": "cpu", "max_epochs": 1, "max_users": 400,
        "model_config.embedding.item_repr": "id+sid", "model_config.heads.semantic_id": True,
        "semantic_ids": {"artifact": str(folder / "sid.npz")}}))
    return folder / "checkpoint.pt"


def live_delays(port: int, checkpoint: Path, n: int, rate: float) -> tuple[list[float], dict]:
    """Announce n new items with the item job's writer; time each until the served generator answers with it."""
    import redis

    from contracts.redis_keys import code_string, feed_entry
    from contracts.user_state_rule import STATE_VERSION
    from jobs.item_semantic_ids_logic import RedisSidIndex
    from models.checkpoint import load_checkpoint
    from serving.generator import GenerationRequest
    from serving.ugt_generator import UGTGenerator
    from serving.user_state_reader import UserStateView

    client = redis.Redis(port=port)
    _, _, _, ckpt = load_checkpoint(checkpoint)
    index = RedisSidIndex(client, "bench")
    index.write((item, code_string(ckpt["semantic_codes"][i])) for item, i in ckpt["vocab"].items())
    taken = {tuple(c) for c in np.asarray(ckpt["semantic_codes"])[1:].tolist()}
    free = [c for c in np.ndindex(*SIZES) if c not in taken][:n]
    gen = UGTGenerator(checkpoint, live_items=n, sid_version="bench",
                       redis_factory=lambda: redis.Redis(port=port, socket_timeout=5))
    history = ["50", "181", "100", "258", "1"]
    state = UserStateView(user_id="u", item_ids=tuple(history), action_tokens=(2,) * 5, rating_tokens=(8,) * 5,
                          event_times=tuple(1_750_000_000_000 + i * 60_000 for i in range(5)), event_count=5,
                          last_event_time=1_750_000_240_000, state_version=STATE_VERSION)
    announced: dict[str, float] = {}
    served: dict[str, float] = {}
    done = threading.Event()
    requests = [0]

    def serve() -> None:  # the inference thread of a busy server
        while not done.is_set():
            gen.recommend_batch([GenerationRequest(state, 10, frozenset(), "movie")])
            requests[0] += 1
            now = time.perf_counter()
            for item in list(announced):
                if item not in served and item in gen.item_to_index:
                    served[item] = now

    gen.start_background()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    time.sleep(1.0)  # the feed thread has resolved the version
    for i, code in enumerate(free):
        item = f"bench-new-{i}"
        announced[item] = time.perf_counter()
        index.write_new([feed_entry({"item_id": item, "genres": ["Drama"], "year": 1999}, code_string(code))])
        time.sleep(1 / rate)
    deadline = time.monotonic() + 30
    while len(served) < len(announced) and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    thread.join(10)
    gen.live.stop()
    delays = [served[i] - announced[i] for i in announced if i in served]
    return delays, {"requests_served": requests[0], "rejected": gen.live.stats.rejected,
                    "not_served": len(announced) - len(served)}


def trie_rebuilds(sizes: list[int]) -> list[dict]:
    from models.ugt.heads import PrefixTrie

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        flat = rng.choice(256**3, size=n, replace=False)
        codes = np.stack([flat // 65536, (flat // 256) % 256, flat % 256, np.zeros(n, np.int64)], 1)
        start = time.perf_counter()
        trie = PrefixTrie(codes, [256, 256, 256, 64])
        rebuild = time.perf_counter() - start
        # what the live catalog does now when 100 items arrive: write them into its trie's spare rows
        grown = PrefixTrie(codes[:-1000], [256, 256, 256, 64]).with_room(1000)
        start = time.perf_counter()
        grown.add(codes[-100:], np.arange(n - 99, n + 1))
        add = time.perf_counter() - start
        del trie, grown
        rows.append({"items": n, "seconds": round(rebuild, 3), "add_100_in_place_s": round(add, 5)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = private_redis(Path(tmp))
        try:
            checkpoint = tiny_checkpoint(Path(tmp))
            anchor = percentiles(anchor_delays(port, args.items, args.rate))
            delays, extra = live_delays(port, checkpoint, args.items, args.rate)
            live = {**percentiles(delays), **extra}
        finally:
            proc.terminate()
            proc.wait(10)
    tries = trie_rebuilds([int(s) for s in args.trie_sizes.split(",")])
    import os

    conditions = {"items": args.items, "rate_per_s": args.rate, "trie_sizes": args.trie_sizes}
    result = {"device": f"{device_name()}, load average {os.getloadavg()[0]:.1f}",
              "anchor_feed_xadd_to_xread": anchor, "live_catalog_feed_to_servable": live,
              "ratio_p50": round(live["p50_ms"] / max(anchor["p50_ms"], 1e-6), 1), "trie_rebuild": tries}
    print("| path | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    for name, row in (("anchor: XADD -> XREAD", anchor), ("live catalog: XADD -> servable", live)):
        print(f"| {name} | {row['n']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |")
    print("\n| catalog items | trie rebuild s (anchor) | add 100 items in place s |\n|---|---|---|")
    for row in tries:
        print(f"| {row['items']:,} | {row['seconds']} | {row['add_100_in_place_s']} |")
    write_result(args.out, "live_items", conditions, result, argv, "python -m bench.live_items")
    return 0 if live["not_served"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
