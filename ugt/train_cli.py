"""`ugt train --config models/configs/<x>.yaml`: train semantic IDs (stage 1), the generator (stage 2), DPO (stage 3).

Under ``torchrun --nproc-per-node N -m ugt train ...`` every rank runs this; rank 0 logs, shows progress, writes the
checkpoints and prints the result line (models/distributed.py, docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (models/configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value; dotted keys reach into dicts), repeatable")
    parser.add_argument("--resume", help="checkpoint.pt or last.pt to continue from (same config; last.pt also at "
                        "another torchrun world size)")
    parser.add_argument("--out-dir", help="where checkpoints, logs and curves go (default runs/<name>)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: config's, auto = cuda if present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--lake", metavar="PATH",
                        help="train on the tokenize job's parquet lake (jobs/lake.py, e.g. var/lake/events_tokens) "
                             "instead of the config's dataset")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


class ConfigError(ValueError):
    """A config (or --set) value `ugt train` cannot use."""


REPORTED = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "hr@50", "ndcg@50", "mrr")


def run(args: argparse.Namespace) -> int:
    """Train; a bad input (config, dataset folder, semantic-ID sizing) is one clear line and exit 2, not a traceback."""
    from contracts.datasets import DatasetError
    from models.semantic_ids.dedup import DedupOverflowError
    from models.train import fit

    main_rank = os.environ.get("RANK", "0").strip() in ("", "0")  # torchrun: rank 0 speaks for the run
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, data = _config_and_data(args)
        summary = fit(cfg, resume=args.resume, data=data)
    except (ConfigError, DatasetError, DedupOverflowError, FileNotFoundError, yaml.YAMLError) as exc:
        print(f"ugt train: {exc}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):  # stopped by UGT_TRAIN_DEADLINE (models/train.py): resumable
        from models.train import INTERRUPTED_EXIT

        if main_rank:
            print(json.dumps({"name": cfg.name, "interrupted": summary["interrupted"],
                              "resume": str(cfg.output_dir / "last.pt")}))
        return INTERRUPTED_EXIT
    if not main_rank:
        return 0
    test = summary["test"]
    print(json.dumps({"name": cfg.name, "model": cfg.model, "dataset": cfg.dataset, "tie_order": cfg.tie_order,
                      **{k: round(test[k], 4) for k in REPORTED if k in test},
                      "train_minutes": round(summary["train_minutes"], 2),
                      "out_dir": str(cfg.output_dir)}))
    return 0


def _config_and_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The run's config (file + --set + flags) and, with --lake, its data; config mistakes raise ConfigError."""
    from models.checkpoint import LAKE_PREFIX
    from models.train_config import load_config

    overrides = parse_overrides(args.set)
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    if args.device:
        overrides["device"] = args.device
    if args.quiet:
        overrides["progress"] = False
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config {args.config} not found")
    data = None
    if args.lake:
        from jobs.lake import lake_sequences

        overrides["dataset"] = f"{LAKE_PREFIX}{args.lake}"
        cfg = _load(load_config, args.config, overrides)
        data = lake_sequences(args.lake, cfg.tie_order, cfg.max_users)
    cfg = _load(load_config, args.config, overrides)
    return cfg, data


def _load(load_config: Callable[..., Any], path: str, overrides: dict) -> Any:
    try:
        return load_config(path, overrides)
    except (TypeError, ValueError) as exc:  # unknown keys, bad values: the config's fault, say so
        raise ConfigError(f"config {path}: {exc}") from None
