"""Compressed inference on CPU: INT8 (``InferenceConfig.quantize = "int8"``, models/ugt/quantize.py) against fp32,
through the serving engine, on ML-100K.

For each model variant (trained here once, cached): every user's next-item request (history = all events but the
last, the last is the target, the request time is the target's; the whole history excluded) runs through one fp32
and one int8 engine (CPU, fp32 activations, one torch thread as serving runs, no KV cache: every request a
prefill). Reported per row: HR@10 / NDCG@10 of the engine's top 10, HR@10 loss and ratio vs fp32, the top-10
overlap with fp32, requests/s at each batch size (best of --repeats passes over all users, every engine taking its
turn in each repeat) and cpu_speedup (int8 req/s over fp32 req/s at the largest batch). ``speedup`` (GPU engine vs bf16) is null: no GPU INT8/FP8 path here. The distilled
student's fp32 row also carries its HR@10 ratio and CPU speedup against its teacher's fp32 row.

  python -m bench.compression                    # writes bench/results/compression.json
  python -m bench.compression --variants tiny    # one variant
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPO, print_table, result_path, write_result

PROG = "python -m bench.compression"
TINY_CONFIG = "models/configs/ugt_ml100k_tiny.yaml"
# name -> overrides of the tiny config: the shipped tiny model, a wider one (where matmuls weigh more), and the tiny
# shape distilled from the wide one (models/distill.py; {work} is --work-dir)
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "wide": {"name": "ugt-ml100k-wide", "model_config.d_model": 128, "model_config.num_layers": 2,
             "model_config.num_heads": 2, "model_config.dqk": 64, "model_config.dv": 64,
             "model_config.moe.d_ff": 256, "max_epochs": 6},
    "student": {"name": "ugt-ml100k-student", "distill": {"teacher": "{work}/wide/checkpoint.pt", "weight": 0.5,
                                                          "temperature": 2.0}},
}
TEACHER = {"student": "wide"}


def trained(variant: str, work: Path) -> Path:
    """The variant's checkpoint, trained once on CPU into ``work/<variant>``."""
    out = work / variant
    checkpoint = out / "checkpoint.pt"
    if not checkpoint.is_file():
        from models.train import fit
        from models.train_config import load_config

        overrides = dict(VARIANTS[variant])
        if variant in TEACHER:
            trained(TEACHER[variant], work)
            overrides["distill"] = {**overrides["distill"],
                                    "teacher": overrides["distill"]["teacher"].format(work=work)}
        print(f"training {variant} once into {out} ...", file=sys.stderr)
        fit(load_config(str(REPO / TINY_CONFIG), {**overrides, "out_dir": str(out), "progress": True,
                                                   "device": "cpu"}))
    return checkpoint


def against_teachers(rows: list[dict[str, Any]], last: str) -> None:
    """A distilled student's fp32 row against its teacher's fp32 row of the same run (HR@10 ratio, CPU speedup)."""
    fp32 = {row["variant"]: row for row in rows if row["quantize"] == "none"}
    for student, teacher in TEACHER.items():
        if student in fp32 and teacher in fp32:
            mine, theirs = fp32[student], fp32[teacher]
            mine.update({"teacher": theirs["config"],
                         "hr@10_ratio_vs_teacher": round(mine["hr@10"] / theirs["hr@10"], 4),
                         "cpu_speedup_vs_teacher": round(mine[last] / theirs[last], 3)})


def requests(model: Any, cfg: Any, data: Any) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray], np.ndarray]:
    """(model rows, excluded items, targets): each user's last event asked for from everything before it."""
    from models.checkpoint import long_history_len
    from models.data import history_row

    rows, excludes, targets = [], [], []
    for items, times, ratings in zip(data.items, data.times, data.ratings, strict=True):
        if len(items) < 3:
            continue
        rows.append(history_row(items[:-1], times[:-1], ratings[:-1], cfg.max_len, long_history_len(cfg),
                                int(times[-1])))
        excludes.append(np.unique(items[:-1]))
        targets.append(int(items[-1]))
    return rows, excludes, np.asarray(targets)


def quality(top: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """HR@10 and NDCG@10 of top-10 lists (n, 10) against one target each."""
    hit = top == targets[:, None]
    rank = hit.argmax(axis=1)
    found = hit.any(axis=1)
    return {"hr@10": float(found.mean()), "ndcg@10": float((found / np.log2(rank + 2)).mean())}


def one_pass(engine: Any, vectors: np.ndarray, excl: np.ndarray, batch: int) -> float:
    """Seconds to answer every user's request in batches of ``batch``."""
    began = time.perf_counter()
    for start in range(0, len(vectors), batch):
        engine.recommend_packed(vectors[start : start + batch], excl[start : start + batch], 10)
    return time.perf_counter() - began


def throughputs(engines: dict[str, tuple[Any, np.ndarray, np.ndarray]], batches: list[int],
                repeats: int) -> dict[str, dict[int, float]]:
    """Requests/s per engine and batch size, best of ``repeats``; the engines take turns within each repeat, so a
    change in the shared box's load falls on all of them rather than on whichever ran last."""
    best = {name: dict.fromkeys(batches, float("inf")) for name in engines}
    for engine, vectors, excl in engines.values():
        engine.recommend_packed(vectors[:32], excl[:32], 10)  # warm-up
    for _ in range(repeats):
        for name, (engine, vectors, excl) in engines.items():
            for b in batches:
                best[name][b] = min(best[name][b], one_pass(engine, vectors, excl, b))
    return {name: {b: len(engines[name][1]) / t for b, t in by.items()} for name, by in best.items()}


def measure(variant: str, work: Path) -> tuple[list[dict[str, Any]], dict[str, tuple[Any, np.ndarray, np.ndarray]]]:
    """The fp32 and int8 rows of one variant (quality), and their engines with their packed requests (timing)."""
    from models.checkpoint import load_checkpoint
    from models.ugt.inference import InferenceConfig, UGTInference

    model, cfg, data, _ = load_checkpoint(trained(variant, work))
    rows, excludes, targets = requests(model, cfg, data)
    out, tops, engines = [], {}, {}
    for quantize in ("none", "int8"):
        engine = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", quantize=quantize))
        vectors, excl = engine.row_vectors(rows), engine.exclusion_matrix(excludes)
        tops[quantize] = np.stack([t.indices for t in engine.recommend_packed(vectors, excl, 10)])
        name = f"{cfg.name} {'int8' if quantize == 'int8' else 'fp32'}"
        engines[name] = (engine, vectors, excl)
        out.append({"config": name, "variant": variant, "quantize": quantize,
                    "parameters": sum(p.numel() for p in model.parameters()), **quality(tops[quantize], targets)})
    base = out[0]
    for row in out:
        row.update({"hr@10_loss": round(base["hr@10"] - row["hr@10"], 4),
                    "hr@10_ratio": round(row["hr@10"] / base["hr@10"], 4) if base["hr@10"] else None,
                    "top10_overlap_vs_fp32": float(np.mean([len(set(a) & set(b)) / 10 for a, b in
                                                            zip(tops["none"].tolist(), tops[row["quantize"]].tolist(),
                                                                strict=True)]))})
    return out, engines


def add_speeds(rows: list[dict[str, Any]], speeds: dict[str, dict[int, float]], batches: list[int]) -> None:
    """req/s columns, and cpu_speedup: int8 over its fp32 row at the largest batch (``speedup``, GPU: null)."""
    last = max(batches)
    fp32 = {row["variant"]: row["config"] for row in rows if row["quantize"] == "none"}
    for row in rows:
        row.update({f"req_s@{b}": round(speeds[row["config"]][b], 1) for b in batches})
        row.update(cpu_speedup=round(speeds[row["config"]][last] / speeds[fp32[row["variant"]]][last], 3),
                   speedup=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--batches", default="1,32", help="batch sizes to time (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over all users; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (serving's torch_threads: 1)")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "ugt" / "bench" / "compression"),
                        help="where the trained variants are cached")
    parser.add_argument("--out", default=str(result_path("compression")), help="result JSON")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    for v in variants:  # training (untimed) first, so the load averages below are the measurement's
        trained(v, Path(args.work_dir))
    rows, engines = [], {}
    for v in variants:
        variant_rows, variant_engines = measure(v, Path(args.work_dir))
        rows += variant_rows
        engines.update(variant_engines)
    load_before = os.getloadavg()[0]
    add_speeds(rows, throughputs(engines, batches, args.repeats), batches)
    load_after = os.getloadavg()[0]
    against_teachers(rows, f"req_s@{max(batches)}")
    print_table(rows, ["config", "parameters", "hr@10", "ndcg@10", "hr@10_loss", "hr@10_ratio",
                       "top10_overlap_vs_fp32", *[f"req_s@{b}" for b in batches], "cpu_speedup",
                       "hr@10_ratio_vs_teacher", "cpu_speedup_vs_teacher"])
    conditions = {"dataset": "ml-100k (all 943 users; target = each user's last event, whole history excluded)",
                  "recipe": {v: {"config": TINY_CONFIG, "overrides": VARIANTS[v]} for v in variants},
                  "engine": "models.ugt.inference.UGTInference, CPU, fp32 activations, no KV cache (every request "
                            "a prefill), top-10 by retrieval",
                  "int8": "torch.ao.quantization.quantize_dynamic, per-channel int8 weights of every stack matmul "
                          "(models/ugt/quantize.py); activations quantized per batch",
                  "torch_threads": args.threads, "batches": batches, "repeats": args.repeats,
                  "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
                  "box": "the 2-core CPU box, shared with other work (timings are best of repeats)",
                  "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)}}
    write_result(args.out, "compression", conditions, {"rows": rows}, argv, PROG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
