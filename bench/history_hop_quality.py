"""What serving's ``history_hop`` costs in quality: a trained checkpoint evaluated with the window's start moving in
hops of 0 (the last max_len events), 16, 32, 64 ... events (models.data.window_start), HSTU protocol.

A full window that slides with every event changes every position of the model's row, so no KV prefix can be
reused: every request of a user past ``max_len`` events is a prefill. With a hop of H the window's start stays put
for H - 1 new events (KV appends) and the window holds ``max_len - H + 1`` to ``max_len`` events. This bench says
what those fewer events cost: leave-one-out by time, full ranking over every item, the window's items masked,
validation and test, one row per (split, hop). The events before the window stay long-term input (as the
evaluator keeps them at hop 0). Pick the hop on validation; test is reported beside it.

    python -m bench.history_hop_quality --checkpoint runs/ugt-ml1m/checkpoint.pt --hops 0,16,32,64 --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result

METRICS = ("hr@10", "ndcg@10", "hr@50", "hr@200", "mrr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `ugt train`")
    p.add_argument("--hops", default="0,16,32,64", help="comma-separated history_hop values (0 = slide per event)")
    p.add_argument("--splits", default="valid,test", help="comma-separated splits")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (a CPU takes ~15 min per row at ML-1M)")
    p.add_argument("--out", default="bench/results/history_hop_quality.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from models.checkpoint import load_checkpoint, long_history_len
    from models.data import make_split
    from models.eval import evaluate
    from models.train_config import pick_device

    device = pick_device(args.device)
    model, cfg, data, _ = load_checkpoint(args.checkpoint, map_location="cpu")
    model.to(device)
    hops = [int(h) for h in args.hops.split(",")]
    bad = [h for h in hops if not 0 <= h < cfg.max_len]
    if bad:
        raise SystemExit(f"--hops must be in 0..{cfg.max_len - 1} (the checkpoint's max_len - 1), got {bad}")
    rows = []
    for split_name in args.splits.split(","):
        base = None
        for hop in hops:
            split = make_split(data, split_name, cfg.max_len, long_history_len(cfg), hop=hop)
            result = evaluate(model, data, split, split_name, device=device, mask_history="window")
            full = split.lengths == cfg.max_len
            row = {"split": split_name, "hop": hop, "users": len(split),  # full windows: rows of max_len events
                   "mean_window": round(float(split.lengths.mean()), 2), "full_windows": int(full.sum()),
                   **{m: round(float(result[m]), 4) for m in METRICS}}
            base = base or row
            row["delta_hr@10"] = round(row["hr@10"] - base["hr@10"], 4)
            row["delta_ndcg@10"] = round(row["ndcg@10"] - base["ndcg@10"], 4)
            rows.append(row)
            print_table([row])
    import torch

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return {"device": f"{name} (torch {torch.__version__})", "model": cfg.name, "max_len": cfg.max_len, "max_long": long_history_len(cfg), "dataset": cfg.dataset,
            "tie_order": cfg.tie_order, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    conditions = {"checkpoint": Path(args.checkpoint).name, "hops": args.hops, "splits": args.splits,
                  "device": args.device, "protocol": "leave-one-out by time, full ranking, window's items masked",
                  "long_term": "the events before the window stay long-term input (max_long), as at hop 0"}
    write_result(Path(args.out), "history_hop_quality", conditions, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
