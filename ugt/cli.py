"""The one `ugt` command line.

Each subcommand lives in the package that owns it, as a module with two functions:
``add_arguments(parser)`` and ``run(args) -> int``. The table below only names them, so
``ugt --help`` stays fast (no torch, no pyflink imported until a subcommand needs it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their subcommand runs
# (or when `ugt <name> --help` is asked for).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "stack": ("ugt.stack_cli", "start, stop or inspect the local stack (Kafka, Schema Registry, Redis, Flink)"),
    "data": ("streams.data_cli", "fetch and convert datasets (MovieLens-1M / -100K) to UGT events"),
    "publish": ("streams.publish_cli", "publish Avro events to Kafka: one JSON event, a JSONL/CSV file, or a dataset replay"),
    "jobs": ("jobs.cli", "submit, list, stop (with a savepoint) or cancel the Flink jobs on the running cluster"),
    "serve": ("serving.cli", "run the /recommend HTTP service"),
    "semantic-ids": ("ugt.semantic_ids_cli", "build semantic IDs (encoders + RQ-VAE / RQ-k-means + dedup) or report on an artifact"),
    "train": ("ugt.train_cli", "train semantic IDs and the UGT generator from a YAML config"),
    "similar": ("ugt.similar_cli", "build a similar-items index (faiss over a trained model's item vectors) or query one"),
    "eval": ("ugt.eval_cli", "evaluate a trained model with the HSTU protocol (full ranking, leave-one-out)"),
    "experiment": ("ugt.experiment_cli", "read out an A/B experiment: per-arm CTR with intervals, lift, p-value, sample-ratio check"),
    "demo": ("ugt.demo", "the main job end to end: stack up, fetch ML-1M, replay, jobs, query /recommend"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ugt",
        description="UGT: a streaming-first generative recommender. Run `ugt <command> --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"ugt: unknown command {argv[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"ugt {name}", description=help_text)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
