"""`ugt stack up|down|status`: the local Kafka, Schema Registry, Redis and Flink cluster."""

from __future__ import annotations

import argparse
import os
import sys

from tabulate import tabulate

from infra import stack
from infra.flink_home import flink_conf_dir
from infra.settings import PROFILES, get_settings
from infra.stack_errors import StackError
from streams.topics import ensure_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Start, stop or inspect the local stack. Ports come from UGT_KAFKA_PORT, UGT_REGISTRY_PORT, "
        "UGT_REDIS_PORT, UGT_FLINK_PORT, ...; data and logs live under var/ (UGT_VAR), logs in var/log/."
    )
    parser.add_argument("action", choices=("up", "down", "status"),
                        help="up: start what is not healthy (idempotent); down: stop; status: print a table")
    parser.add_argument("--profile", choices=PROFILES, default=None,
                        help="up: single (one broker, one Redis; the default) or cluster (3 KRaft brokers, RF 3, a "
                             "6-node Redis Cluster, 3 TaskManagers; docs/STACK.md). Recorded in var/run/profile, so "
                             "later commands (jobs, serving, down) follow it; UGT_PROFILE overrides")
    parser.add_argument("--only", default="",
                        help=f"comma-separated subset of {','.join(stack.SERVICES)} (default: all)")


def _only(text: str) -> list[str] | None:
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names or None


def print_status(rows: list[dict[str, object]]) -> None:
    table = [[r["service"], r["port"], " ".join(map(str, r["pid"])) or "-",  # type: ignore[call-overload]
              "yes" if r["healthy"] else "NO", r["log"]] for r in rows]
    print(tabulate(table, headers=["service", "port", "pid", "healthy", "log"], disable_numparse=True))


def use_profile(profile: str | None) -> None:
    """`--profile`: record it for this var/ (var/run/profile) and for this process (UGT_PROFILE)."""
    if profile is None:
        return
    os.environ["UGT_PROFILE"] = profile
    s = get_settings()
    record = s.var_dir / "run" / "profile"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(profile + "\n")


def run(args: argparse.Namespace) -> int:
    only = _only(args.only)
    try:
        if args.action == "up":
            use_profile(args.profile)
            took = stack.up(only, after_kafka=ensure_pipeline)
            print(f"stack up in {took['total']:.1f} s")
            print_status(stack.status(only))
            s = get_settings()
            print(f"kafka {s.kafka_bootstrap} | registry {s.registry_url} | redis {s.redis_url} | "
                  f"flink {s.flink_rest_url} (FLINK_CONF_DIR={flink_conf_dir(s)})")
        elif args.action == "down":
            stack.down(only)
            if only is None:  # everything stopped: the next `up` is the default profile again
                (get_settings().var_dir / "run" / "profile").unlink(missing_ok=True)
        else:
            rows = stack.status(only)
            print_status(rows)
            return 0 if all(r["healthy"] for r in rows) else 1
    except StackError as exc:
        print(f"ugt stack {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0
