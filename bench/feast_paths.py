"""Cost of each way UGT writes and reads Feast's online store, per row, on a small loop (docs/FEAST.md).

    .venv/bin/python -m bench.feast_paths [--users 2000] [--batch 500] [--events 50]

Writes of `user_recent_events` rows for --users users, in batches of --batch (the user_state job flushes
such batches), each pass stamped newer than the last so every row is stored:
  * push                  FeatureStore.push(push source, DataFrame, to=ONLINE)  (public API; `--feast-write push`)
  * write_to_online_store FeatureStore.write_to_online_store(view, DataFrame)   (public API)
  * write_rows            UgtRedisOnlineStore.write_rows(config, view, rows)    (the extension; the default)
Reads of the same users, one entity per call (what one /recommend does):
  * get_online_features   serving.user_state_reader.FeastStateReader.read (the SDK, recommend_v1; `state_reader: feast`)
  * online_read           UgtRedisOnlineStore.online_read (Feast's OnlineStore method; protos, no typed view)
  * redis_direct          serving.user_state_reader.RedisStateReader.read (one HMGET + decode; `state_reader: redis`)
CPU is this process's (time.process_time), so Redis's own work is not in it; wall includes the round trips.
Needs Redis and an applied repo (`ugt stack up`, `feast -c feature_repo apply`). Writes bench/results/feast_paths.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from bench.common import print_table, result_path, write_result
from infra.settings import get_settings

VIEW = "user_recent_events"


def user_rows(users: int, events: int) -> list[dict[str, Any]]:
    """One realistic recent-events row per user (``events`` items in the window)."""
    return [
        {
            "user_id": f"bench-feast-{u}",
            "recent_item_ids": [f"item-{(u * 7 + i) % 3706}" for i in range(events)],
            "recent_action_tokens": [2] * events,
            "recent_rating_tokens": [2 + (u + i) % 9 for i in range(events)],
            "recent_event_times": [1_000_000 + 60_000 * i for i in range(events)],
            "event_count": events,
            "last_event_time": 1_000_000 + 60_000 * (events - 1),
            "state_version": 2,
        }
        for u in range(users)
    ]


def cost(run: Callable[[], None], rows: int) -> dict[str, float]:
    """CPU and wall µs per row of one call of ``run`` that handles ``rows`` rows."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return {
        "cpu_us_per_row": round((time.process_time() - cpu) * 1e6 / rows, 1),
        "wall_us_per_row": round((time.perf_counter() - wall) * 1e6 / rows, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000, help="rows written and read (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=500, help="rows per write call (default: %(default)s)")
    parser.add_argument("--events", type=int, default=50, help="events per user's window (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.users < 1 or args.batch < 1 or args.events < 1:
        parser.error("--users, --batch and --events must be >= 1")

    sys.modules.setdefault("torch", None)  # feast imports torch when it can; nothing here needs it
    import pandas as pd
    import redis
    from feast.data_source import PushMode
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from infra.feast_online_store import open_online_store
    from infra.feast_store import FeastRedisLayout, open_feature_store
    from serving.user_state_reader import FeastStateReader, RedisStateReader

    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"bench/feast_paths: Redis at {settings.redis_url} does not answer ({exc})", file=sys.stderr)
        return 1
    store = open_feature_store(settings)
    online = open_online_store(store)
    view = store.get_feature_view(VIEW)
    rows = user_rows(args.users, args.events)
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    stamp = [datetime.now(timezone.utc)]

    def newer() -> datetime:
        stamp[0] += timedelta(milliseconds=1)
        return stamp[0]

    def frame(batch: list[dict[str, Any]]) -> pd.DataFrame:
        out = pd.DataFrame(batch)
        out["event_timestamp"] = newer()
        return out

    writes: dict[str, Callable[[], None]] = {
        "push": lambda: [store.push("user_recent_events_push", frame(b), to=PushMode.ONLINE) for b in batches],
        "write_to_online_store": lambda: [store.write_to_online_store(VIEW, frame(b)) for b in batches],
        "write_rows": lambda: [online.write_rows(store.config, view, b, newer()) for b in batches],
    }
    sdk = FeastStateReader(store, "recommend_v1", client)
    direct = RedisStateReader(client, FeastRedisLayout.from_repo(settings.feature_repo), VIEW)
    keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=r["user_id"])]) for r in rows]
    reads: dict[str, Callable[[], None]] = {
        "get_online_features": lambda: [sdk.read(r["user_id"]) for r in rows],
        "online_read": lambda: [online.online_read(store.config, view, [k]) for k in keys],
        "redis_direct": lambda: [direct.read(r["user_id"]) for r in rows],
    }
    writes["write_rows"]()  # warm up: connections, registry cache, first-call imports
    first = rows[0]["user_id"]
    if sdk.read(first) != direct.read(first) or direct.read(first) is None:
        print("bench/feast_paths: the SDK and the direct reader disagree", file=sys.stderr)
        return 1
    for run in (*writes.values(), *reads.values()):
        run()  # one untimed pass each
    table = [{"path": name, "kind": "write", **cost(run, len(rows))} for name, run in writes.items()]
    table += [{"path": name, "kind": "read", **cost(run, len(rows))} for name, run in reads.items()]
    print(f"\nFeast paths: {args.users} users, {args.events}-event windows, writes in batches of {args.batch}")
    print_table(table)
    write_result(result_path("feast_paths"), "feast_paths",
                 {"users": args.users, "batch": args.batch, "events": args.events,
                  "redis": settings.redis_url, "reads": "one entity per call"},
                 {"results": table}, argv=argv, prog="python -m bench.feast_paths")
    client.delete(*(direct.layout.entity_key("user_id", r["user_id"]) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
