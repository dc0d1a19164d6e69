"""The industrial size of bench/serving_gpu_e2e.py: a random-weight UGT written as a checkpoint `ugt serve` loads.

The model is bench/serving_gpu_workloads.py's ``industrial_model`` (8 layers, d = 256, history 1,024, 1M items,
random semantic IDs, random weights: the serving cost of that size, not a recommender). It is saved the way
`ugt train` saves one (models/checkpoint.py ``save_checkpoint``): a ``lake:`` dataset, so ``load_checkpoint`` takes
the vocabulary (item ids ``item-0`` .. ``item-<items-1>``) and the item metadata from the file alone, and
``ugt serve``, the generator anchors and the engine anchor run on it unchanged. The users are
bench/e2e_users.py's ``synthetic_users`` over the same item ids.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from contracts.tokenizer import TokenVocab

DATASET = "lake:synthetic-industrial"  # not a lake: models.checkpoint's LAKE_PREFIX makes the file self-contained
# the industrial size, and a smoke size a CPU runs in seconds
SIZES = {"industrial": {"items": 1_000_000, "layers": 8, "dim": 256, "history": 1024, "users": 1_000_000},
         "smoke": {"items": 5000, "layers": 2, "dim": 64, "history": 64, "users": 2000}}


def item_name(index: int) -> str:
    """The item id of catalog position ``index`` (0-based; vocabulary index ``index + 1``)."""
    return f"item-{index}"


def resolve_size(args: argparse.Namespace) -> None:
    """Fill the industrial options left unset (None) with the issue's values, or the smoke values under --smoke."""
    if args.size != "industrial":
        return
    defaults = SIZES["smoke" if args.smoke else "industrial"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke and args.append_room == 64:  # the ML-1M default leaves no room in a 64-event window
        args.append_room = 16
    if args.first_events is None:
        args.first_events = args.history - args.append_room
    if not 1 <= args.first_events <= args.history:
        raise SystemExit(f"--first-events must be in 1..--history ({args.history}), got {args.first_events}")


def industrial_data(items: int):
    """The item side of the synthetic catalog: ids, no genres, no years, no titles (what serving needs)."""
    from models.data import SequenceData

    vocab = TokenVocab({item_name(i): i + 1 for i in range(items)})
    return SequenceData(name=DATASET, tie_order="stable", vocab=vocab, user_ids=[], items=[], times=[], ratings=[],
                        genre_names=[], item_genres=np.zeros((items + 1, 1), np.int64),
                        item_year_bucket=np.zeros(items + 1, np.int64), item_titles=[])


def write_industrial_checkpoint(path: Path, items: int, layers: int, dim: int, history: int, seed: int = 0) -> Path:
    """A checkpoint.pt of the random-weight industrial UGT at ``path`` (its folder made); returns ``path``."""
    from bench.serving_gpu_workloads import industrial_codes, industrial_model
    from models.checkpoint import save_checkpoint
    from models.train_config import TrainConfig

    began = time.perf_counter()
    model = industrial_model(items, history, seed=seed, layers=layers, dim=dim)
    data = industrial_data(items)
    cfg = TrainConfig(name=f"industrial-{layers}x{dim}-h{history}-{items}", dataset=DATASET, tie_order="stable",
                      model="ugt", model_config=model.config.to_dict(), seed=seed, max_len=history,
                      device="cpu", compile=False)
    codes = industrial_codes(items, seed)  # the codes the model was built with
    save_checkpoint(path, model, cfg, data, None, {"random_weights": True}, codes, [256, 256, 256])
    print(f"industrial checkpoint ({layers} layers, d={dim}, history {history}, {items} items) written to {path} "
          f"in {time.perf_counter() - began:.1f} s", flush=True)
    return path
