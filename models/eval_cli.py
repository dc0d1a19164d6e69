"""`ugt eval --checkpoint runs/<name>/checkpoint.pt`: HSTU-protocol report as JSON, a markdown table and plots."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

ACCURACY = ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]
BEYOND = ["ild", "genre_diversity", "entropy", "novelty", "long_tail_share", "coverage", "gini"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `ugt train`")
    parser.add_argument("--split", choices=["valid", "test"], default="test")
    parser.add_argument("--mask-history", choices=["window", "all", "none"], default="window",
                        help="window = HSTU's (items in the model's input window); all = whole history")
    parser.add_argument("--history-hop", type=int, default=0,
                        help="the window's start moves in steps of this many events, as serving's history_hop "
                             "key moves it (0 = the last max_len events)")
    parser.add_argument("--top-k", type=int, default=10, help="list length for beyond-accuracy metrics")
    parser.add_argument("--beam-size", type=int, default=100, help="beams for generative (semantic-ID) retrieval (0 = skip that row)")
    parser.add_argument("--rerank-top", type=int, default=-1,
                        help="with a ranking head: retrieval candidates it reorders (-1 = the checkpoint's "
                             "heads.rank_top, 0 = skip the cascade row)")
    parser.add_argument("--no-popularity", action="store_true", help="skip the popularity row")
    parser.add_argument("--out", help="report folder (default: next to the checkpoint, eval_<split>/)")
    parser.add_argument("--device", default="auto")


def plot_report(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        x = np.arange(len(ACCURACY)) + i * width
        axes[0].bar(x, [row.get(k, 0) for k in ACCURACY], width, label=row["model"])
        xb = np.arange(len(BEYOND)) + i * width
        axes[1].bar(xb, [row.get(k, 0) / (max(r.get(k, 0) for r in rows) or 1) for k in BEYOND], width, label=row["model"])
    axes[0].set_xticks(np.arange(len(ACCURACY)) + 0.4 - width / 2, ACCURACY, rotation=30)
    axes[0].set_title("accuracy (full ranking)")
    axes[1].set_xticks(np.arange(len(BEYOND)) + 0.4 - width / 2, BEYOND, rotation=30)
    axes[1].set_title("beyond accuracy (scaled to the max row)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, data: Any = None) -> int:
    """Evaluate; ``data`` (SequenceData in the checkpoint's vocabulary) replaces re-reading the config's dataset
    (ugt/eval_cli.py passes a lake's events this way). A bad input is one clear line and exit 2."""
    from contracts.datasets import DatasetError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.checkpoint).is_file():
        print(f"ugt eval: checkpoint {args.checkpoint} not found (`ugt train` writes runs/<name>/checkpoint.pt)",
              file=sys.stderr)
        return 2
    try:
        return _evaluate(args, data)
    except (DatasetError, ValueError) as exc:
        print(f"ugt eval: {exc}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace, data: Any) -> int:
    from models.baselines.popularity import Popularity
    from models.checkpoint import LAKE_PREFIX, load_checkpoint, long_history_len
    from models.data import make_split
    from models.eval import evaluate, markdown_table
    from models.train_config import pick_device
    from models.ugt.model import UGT

    device = pick_device(args.device)
    model, cfg, data, _ = load_checkpoint(args.checkpoint, data=data, map_location="cpu")
    if not data.user_ids and cfg.dataset.startswith(LAKE_PREFIX):
        raise ValueError(f"{args.checkpoint} was trained on the lake {cfg.dataset[len(LAKE_PREFIX):]}; evaluate it "
                         "with `ugt eval --checkpoint ... [--lake PATH]`, which reads the lake's held-out events")
    model.to(device)
    hop = getattr(args, "history_hop", 0)  # a Namespace built by hand (tests) may predate the option
    if not 0 <= hop < cfg.max_len:
        raise ValueError(f"--history-hop must be in 0..{cfg.max_len - 1} (the checkpoint's max_len - 1), "
                         f"got {hop}")
    split = make_split(data, args.split, cfg.max_len, long_history_len(cfg), hop=hop)
    if len(split) == 0:
        raise ValueError(f"no user of {cfg.dataset} has the 3 events a leave-one-out {args.split} split needs")
    generative = isinstance(model, UGT) and model.sid_head is not None and args.beam_size > 0
    ranked = isinstance(model, UGT) and model.ranker is not None
    rerank_top = (model.config.heads.rank_top if args.rerank_top < 0 else args.rerank_top) if ranked else 0
    result = evaluate(model, data, split, args.split, device=device, mask_history=args.mask_history,
                      top_k=args.top_k, generative=generative, beam_size=args.beam_size, rerank_top=rerank_top)
    rows = [{"model": cfg.name, **result}]
    if generative:
        rows.append({"model": f"{cfg.name} (generative, beam {args.beam_size})", **result["generative"]})
    if "target_aware" in result:
        rows.append({"model": f"{cfg.name} (+ ranking head, top {rerank_top})", **result["target_aware"]})
    if not args.no_popularity:
        pop = evaluate(Popularity(data, args.split), data, split, args.split, device=device,
                       mask_history=args.mask_history, top_k=args.top_k)
        rows.append({"model": "popularity", **pop})
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}"
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(args.checkpoint), "history_hop": hop, "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(rows, ["model"] + ACCURACY + BEYOND)
    (out / "report.md").write_text(
        f"# {cfg.name}: {args.split} ({cfg.dataset}, ties={cfg.tie_order}, mask={args.mask_history}, "
        f"history_hop={hop})\n\n{table}\n"
    )
    plot_report([r for r in rows if "ild" in r], out)
    print(table)
    print(f"\nreport: {out}/report.json, report.md, report.png")
    return 0
