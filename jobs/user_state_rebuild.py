"""Rebuild the online user state from the token lake, after Redis lost its data (a new, empty Redis).

    ugt jobs stop user_state                        # keep its Flink state in a savepoint (prints the path)
    ugt jobs rebuild-user-state                     # the lake -> Feast rows + popularity in Redis
    ugt jobs submit user_state --detached --from-savepoint <path> -- <the job's args>

What user_state keeps in Redis is a function of the events it consumed: each user's `user_recent_events` row and
`user_long_term` row, the popularity ZSET of each domain and each user's applied key (the last event sequence
number n the ZSET counted, jobs/popularity_writer.py). The tokenize job writes every token it publishes to the
lake (jobs/lake.py, committed on the same checkpoints as its Kafka transactions), so the lake holds what user_state
consumed. This command folds the lake with the job's own rule (contracts.user_state_rule, per user in the order
user_state read them: the raw topic's partition and offset) and writes through the job's own writers: the same
rows, and popularity through the same idempotent script, so running it twice, or on a Redis that kept part of its
data, counts no event twice. The long-term row is the fully compacted one (what the job writes at its next
compaction).

Stop user_state first (the command refuses while it runs, unless --while-running): a running job writes to the
empty Redis meanwhile, and its popularity script would then take the rebuilt counts for replays. Resumed from its
savepoint, the job finds the applied keys where it left them and carries on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.tokenizer import TokenizedEvent
from contracts.user_state_rule import (
    APPLIED,
    DEFAULT_MAX_EVENTS,
    LATE,
    UserState,
    apply_checked,
    compact,
    long_term_row,
)

Increments = dict[str, dict[str, tuple[str, list[tuple[int, str]]]]]  # what the popularity writer takes


@dataclass
class RebuiltState:
    """Everything user_state would have put in Redis for the lake's events."""

    states: dict[str, UserState]
    increments: Increments  # {domain: {user: (origin, [(n, item_id), ...])}}
    late: int  # events the lateness rule dropped (the job sent them to the DLQ)
    duplicates: int


def lake_events(frame: Any) -> list[TokenizedEvent]:
    """Lake rows -> TokenizedEvents in the order user_state consumed them (per user: raw partition, offset)."""
    ordered = frame.sort_values(["src_partition", "src_offset", "event_time", "event_id"], kind="stable")
    fields = TokenizedEvent.__dataclass_fields__
    out = []
    for row in ordered.itertuples(index=False):
        # the lake keeps the tokens, not every field of the event (duration_s, item_length_s): those keep defaults
        values = {name: getattr(row, name) for name in fields if hasattr(row, name)}
        values["event_time"] = int(values["event_time"])
        values["context_tokens"] = tuple(int(v) for v in values["context_tokens"])
        values["semantic_ids"] = tuple(int(v) for v in values["semantic_ids"])
        for name in ("action_token", "rating_token", "duration_token", "hour_token", "weekday_token",
                     "tokenizer_version"):
            values[name] = int(values[name])
        values["sid_version"] = values["sid_version"] or ""
        out.append(TokenizedEvent(**values))
    return out


def fold_lake(events: Iterable[TokenizedEvent], max_events: int = DEFAULT_MAX_EVENTS,
              allowed_lateness_ms: int | None = None) -> RebuiltState:
    """The job's rule over the events: states, and each applied event's popularity increment with its n."""
    states: dict[str, UserState] = {}
    increments: Increments = {}
    late = duplicates = 0
    for event in events:
        state, outcome = apply_checked(states.get(event.user_id), event, max_events, allowed_lateness_ms)
        states[event.user_id] = state
        if outcome == APPLIED:
            users = increments.setdefault(event.domain, {})
            users.setdefault(event.user_id, (state.origin, []))[1].append((state.event_count, event.item_id))
        elif outcome == LATE:
            late += 1
        else:
            duplicates += 1
    return RebuiltState(states, increments, late, duplicates)


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def popularity_batches(increments: Increments, max_items: int = 20_000) -> Iterator[Increments]:
    """Split {domain: {user: ...}} into script calls of at most ~max_items increments (a user is never split)."""
    for domain, users in increments.items():
        batch: dict[str, tuple[str, list[tuple[int, str]]]] = {}
        size = 0
        for user, entry in users.items():
            if batch and size + len(entry[1]) > max_items:
                yield {domain: batch}
                batch, size = {}, 0
            batch[user] = entry
            size += len(entry[1])
        if batch:
            yield {domain: batch}


def write_rebuilt(rebuilt: RebuiltState, write_rows: Callable[[list[dict[str, Any]]], None],
                  write_long_rows: Callable[[list[dict[str, Any]]], None],
                  incr_popularity: Callable[[Increments], None], batch_rows: int = 500,
                  progress: Callable[[int], None] = lambda n: None) -> None:
    """Write rows, long-term rows and popularity through the job's writers, in batches."""
    users = sorted(rebuilt.states)
    for chunk in batches(users, batch_rows):
        states = [rebuilt.states[u] for u in chunk]
        write_rows([s.to_feature_row() for s in states])
        write_long_rows([long_term_row(compact(None, s), s) for s in states])
        progress(len(chunk))
    for batch in popularity_batches(rebuilt.increments):
        incr_popularity(batch)


def user_state_running(rest_url: str) -> bool:
    """Is a user_state job RUNNING on the Flink cluster? False when the cluster does not answer."""
    import requests

    try:
        response = requests.get(f"{rest_url}/jobs/overview", timeout=10)
        jobs = response.json().get("jobs", []) if response.ok else []
    except (requests.RequestException, ValueError):
        return False
    return any(j.get("name") == "user_state" and j.get("state") == "RUNNING" for j in jobs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from infra.settings import get_settings
    from jobs.lake import default_lake_dir

    s = get_settings()
    parser.add_argument("--lake", default=str(default_lake_dir()), help="token lake folder (default: %(default)s)")
    parser.add_argument("--redis", default=s.redis_url, help="the Redis to rebuild (default: %(default)s)")
    parser.add_argument("--feature-repo", default=str(s.feature_repo), help="Feast repo (default: %(default)s)")
    parser.add_argument("--max-events", type=int, default=DEFAULT_MAX_EVENTS,
                        help="user_state's --max-events (default: %(default)s)")
    parser.add_argument("--allowed-lateness-s", type=float, default=24 * 3600,
                        help="user_state's --allowed-lateness-s; < 0 turns the rule off (default: %(default)s)")
    parser.add_argument("--state-ttl-days", type=float, default=90.0,
                        help="user_state's --state-ttl-days (TTL of the applied keys; default: %(default)s)")
    parser.add_argument("--while-running", action="store_true",
                        help="rebuild even though a user_state job is RUNNING (see the module docstring)")


def rebuild(args: argparse.Namespace, rest_url: str) -> int:
    """`ugt jobs rebuild-user-state`: returns the exit code."""
    from tqdm import tqdm

    from infra.feast_store import open_feature_store
    from infra.redis_client import redis_from_url
    from jobs.common import _JobSettings
    from jobs.lake import read_lake
    from jobs.popularity_writer import redis_popularity_writer
    from jobs.user_state_logic import feast_direct_writer, feast_long_term_writer

    if args.max_events < 1 or args.state_ttl_days <= 0:
        print("ugt jobs rebuild-user-state: --max-events must be >= 1 and --state-ttl-days > 0", file=sys.stderr)
        return 2
    if not args.while_running and user_state_running(rest_url):
        print("ugt jobs rebuild-user-state: a user_state job is RUNNING; stop it first (`ugt jobs stop user_state`) "
              "and resume it from its savepoint afterwards, or pass --while-running", file=sys.stderr)
        return 1
    try:
        frame = read_lake(Path(args.lake))
    except FileNotFoundError as exc:
        print(f"ugt jobs rebuild-user-state: {exc}", file=sys.stderr)
        return 2
    lateness = None if args.allowed_lateness_s < 0 else int(args.allowed_lateness_s * 1000)
    rebuilt = fold_lake(lake_events(frame), args.max_events, lateness)
    store = open_feature_store(_JobSettings(redis_override=args.redis), repo=args.feature_repo)
    client = redis_from_url(args.redis)
    try:
        with tqdm(total=len(rebuilt.states), desc="users", unit="user", file=sys.stderr) as bar:
            write_rebuilt(rebuilt, feast_direct_writer(store), feast_long_term_writer(store),
                          redis_popularity_writer(client, ttl_s=max(1, int(args.state_ttl_days * 86_400))),
                          progress=bar.update)
    finally:
        client.close()
    applied = sum(len(items) for users in rebuilt.increments.values() for _, items in users.values())
    print(f"rebuilt {len(rebuilt.states)} users from {len(frame)} lake events ({applied} applied, {rebuilt.late} "
          f"late, {rebuilt.duplicates} duplicates) into {args.redis}")
    return 0
