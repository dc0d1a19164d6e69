"""`ugt publish`: put Avro events on Kafka — one JSON event, a JSONL/CSV file, or a dataset replay.

  ugt publish event '{"event_id": "e1", "user_id": "42", "item_id": "7", "action": "CLICK", "event_time": 1700000000000}'
  ugt publish file events.jsonl            # or .csv / .jsonl.gz; --kind item for catalog records
  ugt publish replay ml-1m --limit 100000 --items --speed 1000

Every record is checked against its schema first; a bad one is reported with what is wrong (and the file
line) and nothing from that file is published. Exit codes: 0 all delivered, 1 delivery failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from contracts.datasets import DatasetError
from infra.settings import Settings, get_settings
from streams.producer import DeliveryStats, EventPublisher, PublishError
from streams.records import (
    KEY_FIELD,
    SCHEMA_FOR_KIND,
    RecordError,
    check_event_file,
    iter_event_file,
    parse_json_event,
)
from streams.replay import ReplayResult, replay
from streams.serde import RegistryError
from streams.topics import TopicError, ensure_subject, ensure_topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n")[1]
    sub = parser.add_subparsers(dest="action", metavar="<event|file|replay>", required=True)

    def common(p: argparse.ArgumentParser, kind: bool = True) -> None:
        if kind:
            p.add_argument("--kind", choices=sorted(SCHEMA_FOR_KIND), default=None,
                           help="user (schema user_event) or item (item_event); default: item for the items topic, else user")
            p.add_argument("--topic", help="Kafka topic (default: events.raw for user events, items.catalog for items)")
        p.add_argument("--flush-timeout", type=float, default=120.0, metavar="S",
                       help="seconds to wait for the broker to confirm every record (default 120)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("event", help="publish one event given as a JSON object",
                       description="Publish one event given as a JSON object. Required fields must be present; "
                                   "optional ones get the schema default. event_time: epoch ms or ISO-8601.")
    p.add_argument("json", help="the event as a JSON object (use '-' to read it from stdin)")
    common(p)

    p = sub.add_parser("file", help="publish every event of a .jsonl / .csv file (optionally .gz)",
                       description="Publish every record of a JSON-lines or CSV file (header row = field names; "
                                   "lists as JSON or a|b|c, maps as JSON). The whole file is validated first.")
    p.add_argument("path", type=Path)
    p.add_argument("--speed", type=float, default=None,
                   help="pace by event-time gaps at this multiple of real time (default: as fast as possible)")
    common(p)

    p = sub.add_parser("replay", help="replay a dataset (ml-1m, ml-100k or a generic dataset folder) in event-time order",
                       description="Replay a dataset's ratings as user events in event-time order. With --items, "
                                   "the item catalog goes first to the items topic.")
    p.add_argument("dataset", help="ml-1m, ml-100k, or a folder with interactions.csv (+ items.jsonl)")
    p.add_argument("--speed", type=float, default=None,
                   help="multiple of real time, e.g. 1000 = 1000x (default: as fast as possible)")
    p.add_argument("--max-gap-s", type=float, default=None,
                   help="cap each event-time gap at this many seconds before scaling (skips idle periods)")
    p.add_argument("--limit", type=int, default=None, help="only the first N events in event-time order")
    p.add_argument("--items", action="store_true", help="publish the item catalog first (to --items-topic)")
    p.add_argument("--topic", default=None, help="topic for user events (default events.raw)")
    p.add_argument("--items-topic", default=None, help="topic for item events (default items.catalog)")
    common(p, kind=False)


def _schema_for(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    """(schema name, topic) from --kind / --topic."""
    kind = args.kind or ("item" if args.topic == settings.topics.items else "user")
    schema_name = SCHEMA_FOR_KIND[kind]
    topic = args.topic or (settings.topics.items if kind == "item" else settings.topics.raw)
    return schema_name, topic


def _send_fn(publisher: EventPublisher, topic: str, schema_name: str):  # noqa: ANN202 - a closure
    return lambda record: publisher.publish(topic, schema_name, record)


def _finish(publisher: EventPublisher, timeout_s: float, started: float) -> tuple[DeliveryStats, float]:
    stats = publisher.flush(timeout_s)
    return stats, time.monotonic() - started


def run_event(args: argparse.Namespace, settings: Settings) -> int:
    schema_name, topic = _schema_for(args, settings)
    text = sys.stdin.read() if args.json == "-" else args.json
    record = parse_json_event(text, schema_name)
    ensure_topics(settings, extra=[topic])
    ensure_subject(settings, topic, schema_name)
    publisher = EventPublisher(settings)
    publisher.publish(topic, schema_name, record)
    publisher.flush(args.flush_timeout)
    key = record[KEY_FIELD[schema_name]]
    print(f"published 1 {schema_name} to {topic} (key {key})")
    return 0


def run_file(args: argparse.Namespace, settings: Settings) -> int:
    schema_name, topic = _schema_for(args, settings)
    count = check_event_file(args.path, schema_name)  # all or nothing: bad lines are reported before publishing
    ensure_topics(settings, extra=[topic])
    ensure_subject(settings, topic, schema_name)
    publisher = EventPublisher(settings)
    time_field = "event_time" if schema_name == "user_event" else "updated_at"
    started = time.monotonic()
    result = replay(
        iter_event_file(args.path, schema_name), _send_fn(publisher, topic, schema_name), speed=args.speed,
        time_field=time_field, total=count, idle=publisher.poll, progress=not args.no_progress, desc=topic,
    )
    stats, seconds = _finish(publisher, args.flush_timeout, started)
    print(f"published {stats.by_topic[topic]:,} {schema_name} record(s) from {args.path} to {topic}: "
          f"{_rate(result.count, seconds)}")
    return 0


def _rate(count: int, seconds: float) -> str:
    return f"{count:,} in {seconds:.2f} s = {count / seconds if seconds > 0 else float('inf'):,.0f}/s (delivered)"


def _load(dataset: str) -> Any:
    from contracts.datasets import DATASETS, load_dataset, load_generic

    if dataset in DATASETS:
        return load_dataset(dataset)
    if Path(dataset).is_dir():
        return load_generic(dataset)
    raise DatasetError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)} or a folder with interactions.csv")


def replay_dataset(
    publisher: EventPublisher,
    dataset: Any,
    *,
    limit: int | None = None,
    items: bool = False,
    speed: float | None = None,
    max_gap_s: float | None = None,
    topic: str | None = None,
    items_topic: str | None = None,
    flush_timeout_s: float = 120.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Items (optional, all at once) then user events in event-time order; returns counts and rates."""
    from contracts.datasets import item_events, user_events

    settings = publisher.settings
    topic = topic or settings.topics.raw
    items_topic = items_topic or settings.topics.items
    report: dict[str, Any] = {"dataset": dataset.name}
    if items:
        started = time.monotonic()
        n_items = len(dataset.items)
        replay(item_events(dataset), _send_fn(publisher, items_topic, "item_event"), time_field="updated_at",
               total=n_items, idle=publisher.poll, progress=progress, desc=items_topic)
        stats, seconds = _finish(publisher, flush_timeout_s, started)
        report["items"] = {"topic": items_topic, "count": stats.by_topic[items_topic], "seconds": round(seconds, 3)}
    total = len(dataset.ratings) if limit is None else min(limit, len(dataset.ratings))
    # ordering the dataset by event time happens on the first event: do it before the clock starts, so the
    # rate is the publishing rate (prepare_s says what ordering cost)
    prepare_started = time.monotonic()
    generator = user_events(dataset, limit)
    first = next(generator, None)
    events: Iterator[dict[str, Any]] = itertools.chain([first] if first is not None else [], generator)
    prepare_s = time.monotonic() - prepare_started
    started, cpu_started = time.monotonic(), time.process_time()
    result: ReplayResult = replay(
        events, _send_fn(publisher, topic, "user_event"), speed=speed, max_gap_s=max_gap_s, total=total,
        idle=publisher.poll, progress=progress, desc=topic,
    )
    stats, seconds = _finish(publisher, flush_timeout_s, started)
    cpu_s = time.process_time() - cpu_started  # this process incl. librdkafka threads; load-independent
    report["events"] = {
        "topic": topic, "count": stats.by_topic[topic], "seconds": round(seconds, 3),
        "events_per_s": round(stats.by_topic[topic] / seconds, 1) if seconds > 0 else None,
        "cpu_s": round(cpu_s, 3), "events_per_cpu_s": round(stats.by_topic[topic] / cpu_s, 1) if cpu_s > 0 else None,
        "prepare_s": round(prepare_s, 3), "produce_s": round(result.seconds, 3), "slept_s": round(result.slept_s, 3),
        "max_behind_s": round(result.max_behind_s, 3), "speed": speed,
        "first_event_ms": result.first_event_ms, "last_event_ms": result.last_event_ms,
    }
    return report


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit is not None and args.limit < 0:
        raise RecordError([f"--limit must be >= 0, got {args.limit}"])
    topic = args.topic or settings.topics.raw
    items_topic = args.items_topic or settings.topics.items
    dataset = _load(args.dataset)
    ensure_topics(settings, extra=[topic] + ([items_topic] if args.items else []))
    ensure_subject(settings, topic, "user_event")
    if args.items:
        ensure_subject(settings, items_topic, "item_event")
    publisher = EventPublisher(settings)
    report = replay_dataset(
        publisher, dataset, limit=args.limit, items=args.items, speed=args.speed, max_gap_s=args.max_gap_s,
        topic=topic, items_topic=items_topic, flush_timeout_s=args.flush_timeout, progress=not args.no_progress,
    )
    if "items" in report:
        i = report["items"]
        print(f"items: {_rate(i['count'], i['seconds'])} -> {i['topic']}")
    e = report["events"]
    print(f"user events: {_rate(e['count'], e['seconds'])} -> {e['topic']}")
    print(json.dumps(report))
    return 0


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    # librdkafka warns on transient retries (e.g. "coordinator load in progress") that it recovers from
    # itself; only errors reach the terminal, and failed deliveries are reported by flush() anyway.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("ugt.kafka").setLevel(logging.ERROR)
    handlers = {"event": run_event, "file": run_file, "replay": run_replay}
    try:
        return handlers[args.action](args, settings)
    except RecordError as exc:
        print(f"ugt publish: {exc}", file=sys.stderr)
        return 2
    except (PublishError, TopicError, RegistryError) as exc:
        print(f"ugt publish: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, DatasetError) as exc:
        print(f"ugt publish: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ugt publish: interrupted; records not yet confirmed may be lost", file=sys.stderr)
        return 130
