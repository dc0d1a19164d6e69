"""`ugt eval --checkpoint runs/<name>/checkpoint.pt`: models/eval_cli.py, plus the lake for lake-trained models.

A model trained with `ugt train --lake PATH` (the demo's) has no dataset to re-read: its data is the tokenize job's
parquet lake. This command reads that lake (or --lake PATH) and evaluates the model on the lake's own held-out
events (each user's last event, the leave-one-out split the trainer held out), in the checkpoint's vocabulary:
events of items the model never saw (the lake kept growing) are left out, and users left with fewer than three
events drop out of the split. Lives in ugt/ because reading the lake is the jobs layer's, above models/.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from models import eval_cli

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    eval_cli.add_arguments(parser)
    parser.add_argument("--lake", metavar="PATH",
                        help="for a model trained with `ugt train --lake`: the lake to read held-out events from "
                             "(default: the lake it was trained on)")


def lake_data(checkpoint: str | Path, lake: str | None) -> Any:
    """The lake's sequences in the checkpoint's vocabulary and item metadata, or None for a dataset-trained model."""
    import torch

    from jobs.lake import lake_dataset
    from models.checkpoint import LAKE_PREFIX, items_only_data
    from models.data import build_sequences, limit_users
    from models.train_config import TrainConfig

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**ckpt["config"])
    if not cfg.dataset.startswith(LAKE_PREFIX):
        if lake:
            raise ValueError(f"{checkpoint} was trained on {cfg.dataset}, not on a lake: drop --lake")
        return None
    path = lake or cfg.dataset[len(LAKE_PREFIX):]
    items = items_only_data(cfg, ckpt, checkpoint)  # the vocabulary and item metadata the model was trained with
    events = lake_dataset(path)
    seen = events.ratings["item_id"].astype(str).isin(items.vocab.item_to_index)
    if not seen.any():
        raise ValueError(f"no event of the lake {path} is of an item {checkpoint} was trained on")
    if not seen.all():
        log.info("lake %s: %d of %d events are of items the model never saw; left out", path, int((~seen).sum()),
                 len(seen))
    sequences = limit_users(build_sequences(events, cfg.tie_order, vocab=items.vocab), cfg.max_users)
    log.info("evaluating on the lake %s: %d users", path, sequences.num_users)
    return replace(items, name=f"{LAKE_PREFIX}{path}", user_ids=sequences.user_ids, items=sequences.items,
                   times=sequences.times, ratings=sequences.ratings)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = None
    if Path(args.checkpoint).is_file():
        try:
            data = lake_data(args.checkpoint, args.lake)
        except (FileNotFoundError, ValueError) as exc:
            print(f"ugt eval: {exc}", file=sys.stderr)
            return 2
    return eval_cli.run(args, data=data)
