"""Per-event cost of the user_state job's keyed logic outside Flink (what each Python operator call costs).

    .venv/bin/python -m bench.user_state_cost [--events 100000] [--repeat 3] [--rate 50000] [--profile]

Rows, all over the same first --events ML-1M events (tokenized before timing), best of --repeat passes,
in µs per event:
  * anchor_v1_dict_pickle: the state round trip the job did before (pickle.loads of the stored dict,
    UserState.from_dict, apply_event, to_dict, pickle.dumps), without writes: the anchor of this run;
  * processor_no_cache: jobs.user_state_logic.UserStateProcessor with --state-cache-users 0 (decode and
    encode the compact blob every event), its writer building the Feast protos and popularity script
    arguments of every flush (no Redis), and its confirm / compaction timers fired at a simulated
    --rate events/s of processing time;
  * processor_cached: the same with the decoded-state cache (the job's default);
  * batch_per_record_decode_fold / batch_decode_fold: the events as micro-batches of wire-format records
    (grouped per user within each --batch-events run of events), decoded and folded as UserStateBatchFunction
    does with --batch-fold per-record (decode_keyed + on_event per record) and --batch-fold batch
    (TokenBatchDecoder + on_events per batch); cached state, no timers, no writes.
No Kafka, Redis or Flink. Writes bench/results/user_state_cost.json.
"""

from __future__ import annotations

import argparse
import cProfile
import pickle
import pstats
import time
from typing import Any

from tqdm import tqdm

from bench.common import print_table, result_path, write_result
from jobs.dict_store import DictKeyedStore

PROG = "python -m bench.user_state_cost"




class NoRedis:
    """register_script -> a callable that takes the arguments and does nothing (no round trip)."""

    def register_script(self, _: str):
        return lambda keys, args: None


def anchor(events: list) -> float:
    from contracts.user_state_rule import UserState, apply_event

    store: dict[str, bytes] = {}
    start = time.perf_counter()
    for event in events:
        raw = store.get(event.user_id)
        state = UserState.from_dict(pickle.loads(raw)) if raw is not None else None
        state = apply_event(state, event)
        store[event.user_id] = pickle.dumps(state.to_dict())
    return time.perf_counter() - start


def processor_run(events: list, cache_users: int, rate: float) -> tuple[float, dict[str, Any]]:
    from datetime import datetime, timezone

    from contracts.user_state_rule import LONG_TERM_VIEW
    from infra.feast_online_store import entry_builder
    from infra.feast_store import repo_feature_views
    from jobs.popularity_writer import redis_popularity_writer
    from jobs.user_state_logic import (
        FEATURE_VIEW,
        OnlineStateWriter,
        ProcessorConfig,
        UserStateProcessor,
    )

    views = repo_feature_views()
    recent, long_ = entry_builder(views[FEATURE_VIEW]), entry_builder(views[LONG_TERM_VIEW])
    now_dt = datetime.now(timezone.utc)
    sim = {"now_ms": 0}
    writer = OnlineStateWriter(lambda rows: recent(rows, now_dt), redis_popularity_writer(NoRedis()),
                               max_rows=500, max_delay_s=0.2, clock=lambda: sim["now_ms"] / 1000,
                               write_long_rows=lambda rows: long_(rows, now_dt))
    processor = UserStateProcessor(writer, ProcessorConfig(cache_size=cache_users, compact_interval_ms=60_000))
    store = DictKeyedStore({})
    timers: dict[int, set[str]] = {}
    step_ms = 1000.0 / rate
    start = time.perf_counter()
    for i, event in enumerate(events):
        now = int(i * step_ms)
        sim["now_ms"] = now
        for at in sorted(t for t in timers if t <= now):  # what Flink's timer service would fire by now
            for user in sorted(timers.pop(at)):
                store.user = user
                for _, new_at in processor.on_timer(user, at, store, now):
                    timers.setdefault(new_at, set()).add(user)
        store.user = event.user_id
        outcome = processor.on_event(event, store, now)
        for _, at in outcome.timers:
            timers.setdefault(at, set()).add(event.user_id)
        processor.flush_if_due()
    writer.flush()
    elapsed = time.perf_counter() - start
    return elapsed, {"rows_written": writer.rows_written, "batches": writer.batches_written,
                     "compactions": processor.compactions}


class OneSchemaRegistry:
    """schema_by_id for the one writer schema the batches carry (no registry round trip)."""

    def schema_by_id(self, _: int):
        from streams.serde import load_schema

        return load_schema("tokenized_event")


def key_batches(events: list, batch_events: int) -> list[tuple[bytes, bytes]]:
    """The events as user_state's micro-batches: wire-format records, grouped per user within each run of
    `batch_events` consecutive events (what the JVM batcher makes of a --batch-ms window), in the
    jobs.user_state_batch format."""
    from jobs.user_state_batch import pack_records
    from streams.serde import encode_with_id, load_schema

    schema = load_schema("tokenized_event")
    batches = []
    for start in range(0, len(events), batch_events):
        by_user: dict[str, list] = {}
        for i, event in enumerate(events[start:start + batch_events], start):
            by_user.setdefault(event.user_id, []).append((encode_with_id(1, schema, event.to_record()), 0, i))
        batches.extend((user.encode(), pack_records(records)) for user, records in by_user.items())
    return batches


def batch_run(batches: list[tuple[bytes, bytes]], events: int, per_record: bool) -> tuple[float, dict[str, Any]]:
    """Decode + fold of every micro-batch as UserStateBatchFunction does it (no Flink, no timers, no writes):
    per_record = each record through decode_keyed and on_event (--batch-fold per-record), else TokenBatchDecoder
    and on_events (--batch-fold batch)."""
    from jobs.token_batch import TokenBatchDecoder, decode_keyed
    from jobs.user_state_batch import iter_records
    from jobs.user_state_logic import OnlineStateWriter, ProcessorConfig, UserStateProcessor
    from streams.serde import AvroSerde

    serde = AvroSerde(OneSchemaRegistry())
    decoder = TokenBatchDecoder(serde)
    processor = UserStateProcessor(OnlineStateWriter(lambda rows: None, lambda batch: None, max_rows=10**9,
                                                     max_delay_s=1e9), ProcessorConfig())
    store = DictKeyedStore({})
    start = time.perf_counter()
    for key, data in batches:
        store.user = key.decode()
        if per_record:
            for value, _, _ in iter_records(data):
                processor.on_event(decode_keyed(serde, value, key), store, 1_000)
        else:
            decoded = [record[0] for record in decoder.decode(data, key)]
            processor.on_events(decoded, store, 1_000)
    elapsed = time.perf_counter() - start
    return elapsed, {"batches": len(batches), "events_per_batch": round(events / len(batches), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="ML-1M events, in time order")
    parser.add_argument("--repeat", type=int, default=3, help="passes per row; the best counts")
    parser.add_argument("--rate", type=float, default=50_000, help="simulated events/s (when timers fire)")
    parser.add_argument("--batch-events", type=int, default=2000,
                        help="the batch rows: consecutive events grouped per user, as a --batch-ms window would")
    parser.add_argument("--profile", action="store_true", help="cProfile one cached pass; print the top 15")
    args = parser.parse_args(argv)

    from contracts.datasets import load_dataset, user_events
    from contracts.tokenizer import tokenize_event

    dataset = load_dataset("ml-1m")
    events = [tokenize_event(e) for e in tqdm(user_events(dataset, limit=args.events), total=args.events,
                                              desc="tokenize", unit="ev", unit_scale=True, mininterval=0.5)]
    users = len({e.user_id for e in events})
    batches = key_batches(events, args.batch_events)
    rows: list[dict[str, Any]] = []
    cases = [("anchor_v1_dict_pickle", lambda: (anchor(events), {})),
             ("processor_no_cache", lambda: processor_run(events, 0, args.rate)),
             ("processor_cached", lambda: processor_run(events, 5_000, args.rate)),
             ("batch_per_record_decode_fold", lambda: batch_run(batches, len(events), per_record=True)),
             ("batch_decode_fold", lambda: batch_run(batches, len(events), per_record=False))]
    for name, case in tqdm(cases, desc="cases", unit="case"):
        best, extra = min((case() for _ in range(args.repeat)), key=lambda r: r[0])
        rows.append({"case": name, "us_per_event": best / len(events) * 1e6,
                     "events_per_s": len(events) / best, **extra})
    anchor_us = rows[0]["us_per_event"]
    for row in rows:
        row["speedup_vs_anchor"] = anchor_us / row["us_per_event"]
    print(f"\n{len(events):,} ML-1M events, {users:,} users, best of {args.repeat}")
    table = print_table(rows, ["case", "us_per_event", "events_per_s", "speedup_vs_anchor", "rows_written",
                               "compactions", "events_per_batch"])
    profile_text = ""
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        processor_run(events, 5_000, args.rate)
        profiler.disable()
        import io

        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
        profile_text = out.getvalue()
        print(profile_text)
    conditions = {"events": len(events), "users": users, "rate": args.rate, "repeat": args.repeat,
                  "batch_events": args.batch_events,
                  "anchor": "anchor_v1_dict_pickle"}
    write_result(result_path("user_state_cost"), "user_state_cost", conditions,
                 {"rows": rows, "table": table, "profile": profile_text}, argv, PROG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
