"""`ugt train --config models/configs/<x>.yaml`: train semantic IDs (stage 1), the generator (stage 2), DPO (stage 3)."""

from __future__ import annotations

import argparse
import json
import logging

import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (models/configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value; dotted keys reach into dicts), repeatable")
    parser.add_argument("--resume", help="checkpoint.pt to continue from (same config)")
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


def run(args: argparse.Namespace) -> int:
    from models.checkpoint import LAKE_PREFIX
    from models.train import fit
    from models.train_config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = parse_overrides(args.set)
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    if args.device:
        overrides["device"] = args.device
    if args.quiet:
        overrides["progress"] = False
    data = None
    if args.lake:
        from jobs.lake import lake_sequences

        overrides["dataset"] = f"{LAKE_PREFIX}{args.lake}"
        cfg = load_config(args.config, overrides)
        data = lake_sequences(args.lake, cfg.tie_order, cfg.max_users)
    cfg = load_config(args.config, overrides)
    summary = fit(cfg, resume=args.resume, data=data)
    if summary.get("interrupted"):  # stopped by UGT_TRAIN_DEADLINE (models/train.py): resumable
        from models.train import INTERRUPTED_EXIT

        print(json.dumps({"name": cfg.name, "interrupted": summary["interrupted"],
                          "resume": str(cfg.output_dir / "last.pt")}))
        return INTERRUPTED_EXIT
    test = summary["test"]
    print(json.dumps({"name": cfg.name, "model": cfg.model, "tie_order": cfg.tie_order,
                      **{k: round(test[k], 4) for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr")},
                      "train_minutes": round(summary["train_minutes"], 2),
                      "out_dir": str(cfg.output_dir)}))
    return 0
