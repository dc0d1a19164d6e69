"""Stream-vector rows of the cold-start bench (bench/cold_start.py --stream-k): a trained held-out run's checkpoint,
re-evaluated with its new items scored by their stream vectors (models/ugt/stream_items.py), one row per ``k``.

No training: the run's kept model embeds, from the whole event log, the user state before every event of a new
item; each evaluation row (valid and test, split by whether the target is new) sees the sums of the days before
its request's day only. The rows carry ``valid_cold`` / ``valid_warm`` so ``k`` is chosen on validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.checkpoint import load_checkpoint, long_history_len
from models.data import cold_item_mask, make_split
from models.eval import evaluate
from models.ugt.stream_items import background_sums, daily_sums, event_states, mean_state, training_events

PARTS = ("test", "test_cold", "test_warm", "valid_cold", "valid_warm")
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "mrr")


def stream_rows(run_dir: str | Path, run_name: str, specs: list[tuple[float, ...]],
                device: str = "cpu") -> list[dict[str, Any]]:
    """Rows ``<run_name>+stream_k<k>_c<gamma>[_s<scale>][_b<share>]`` (bench/cold_start.py's row shape) for each
    (k, gamma, scale[, share]) of ``specs``: the stream blend's ``k``, the share ``gamma`` of the mean training state
    taken out of each new item's state mean (models/ugt/stream_items.mean_state), the rows' length ``scale`` (1 = a
    trained row's), and the share of the softmax background taken out (models/ugt/stream_items.background_sums;
    0 = none)."""
    run_dir = Path(run_dir)
    model, cfg, data, _ = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
    model.to(device).eval()
    spec = {k: v for k, v in (cfg.cold_items or {}).items() if k != "holdout"}
    cold = cold_item_mask(data, spec)
    if cold is None or not (cfg.cold_items or {}).get("holdout", True):
        raise ValueError(f"{run_dir}: not a held-out cold-start run (cold_items {cfg.cold_items})")
    max_long = long_history_len(cfg)
    splits = {s: make_split(data, s, cfg.max_len, max_long) for s in ("valid", "test")}
    sums = daily_sums(model, data, cold, cfg.max_len, max_long, device, cfg.eval_batch_size)
    stored = getattr(model.embed, "stream_mean", None)  # what `ugt train` stored for serving (stream_k > 0)
    sums.center = stored if stored is not None and bool(stored.any()) else mean_state(
        model, training_events(data, cold, cfg.max_len, max_long), device, cfg.eval_batch_size)
    rows, events = [], None
    for k, gamma, scale, *rest in specs:
        share = float(rest[0]) if rest else 0.0
        sums.k, sums.gamma, sums.scale = float(k), float(gamma), float(scale)
        sums.background, sums.background_share = None, share
        if share:
            if events is None:
                events = event_states(model, data, sums.first_day, cfg.max_len, max_long, device, cfg.eval_batch_size)
            sums.background = background_sums(sums, model.item_embeddings().float(), *events, cfg.temperature)
        name = (f"{run_name}+stream_k{k:g}_c{gamma:g}" + (f"_s{scale:g}" if scale != 1 else "")
                + (f"_b{share:g}" if share else ""))
        row: dict[str, Any] = {"run": name, "stream_k": float(k), "stream_center": float(gamma),
                               "stream_scale": float(scale), "stream_background": share, "from_run": run_name}
        for part in PARTS:
            split = part.split("_")[0]
            rows_of = splits[split]
            if part != split:
                is_cold = cold[rows_of.targets]
                rows_of = rows_of.subset(is_cold if part.endswith("cold") else ~is_cold)
            acc = evaluate(model, data, rows_of, split, device=device, batch_size=cfg.eval_batch_size,
                           mask_history=cfg.mask_history, beyond=False, stream=sums)
            row[part] = {"users": acc["users"], **{m: round(float(acc[m]), 4) for m in METRICS}}
        rows.append(row)
    return rows

