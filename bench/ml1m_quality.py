"""ML-1M quality benchmark: SASRec, HSTU, HSTU-large, UGT and popularity in one harness, side by side.

Each (model, tie order) pair is one `ugt train` run of the frozen config models/configs/<model>_ml1m.yaml;
runs go in parallel subprocesses (the models are small, so several share one GPU well). The table goes
to stdout, the rows to bench/results/ml1m_quality.json and the report to docs/RESULTS.md.

    python bench/ml1m_quality.py                       # everything, both tie orders
    python bench/ml1m_quality.py --models sasrec --splits hstu --set max_epochs=2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (bench/gpu_ml1m.sh): the repo's packages importable
    sys.path.insert(0, str(REPO))
from bench.common import markdown_table, write_result  # noqa: E402

PROG = "python bench/ml1m_quality.py"
MODELS = ("sasrec", "hstu", "hstu_large", "ugt", "popularity")
LABELS = {"sasrec": "SASRec", "hstu": "HSTU", "hstu_large": "HSTU-large", "ugt": "UGT", "popularity": "Popularity"}
# The HSTU paper's ML-1M numbers (Zhai et al. 2024, Table 4), HR@10 / NDCG@10.
ANCHORS = {"sasrec": (0.2853, 0.1603), "hstu": (0.3097, 0.1720), "hstu_large": (0.3294, 0.1893)}
TARGETS = {"ugt": (0.345, 0.200)}
COLUMNS = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list of {', '.join(MODELS)}; MODEL@SPLIT runs one tie order only")
    p.add_argument("--splits", default="hstu,stable", help="tie orders: hstu (HSTU's sort), stable (file order)")
    p.add_argument("--variants", default="", help="extra runs NAME:CONFIG.yaml[:KEY=VALUE;...] (comma list)")
    p.add_argument("--parallel", type=int, default=10, help="runs at once")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--runs-dir", default="runs/bench", help="where each run writes checkpoints and logs")
    p.add_argument("--out", default="bench/results/ml1m_quality.json")
    p.add_argument("--results-md", default="docs/RESULTS.md")
    p.add_argument("--collect-only", action="store_true", help="only gather existing summaries")
    return p.parse_args(argv)


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        return f"cpu (torch {torch.__version__}, {os.cpu_count()} cores)"
    except ImportError:
        return "unknown"


def plan(args: argparse.Namespace) -> list[dict]:
    runs = []
    for entry in [m for m in args.models.split(",") if m]:
        model, _, only = entry.partition("@")  # "sasrec@stable" runs that tie order only
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {MODELS}")
        for split in [only] if only else [s for s in args.splits.split(",") if s]:
            runs.append({"model": model, "label": LABELS[model], "split": split,
                         "config": f"models/configs/{model}_ml1m.yaml", "sets": [f"tie_order={split}"]})
    for spec in [v for v in args.variants.split(",") if v]:
        name, config, *rest = spec.split(":")
        sets = rest[0].split(";") if rest else []
        for split in [s for s in args.splits.split(",") if s]:
            runs.append({"model": name, "label": name, "split": split, "config": config,
                         "sets": [f"tie_order={split}", *sets]})
    for run in runs:
        run["name"] = f"{run['model']}-{run['split']}"
        run["out_dir"] = f"{args.runs_dir}/{run['name']}"
    return runs


def launch(run: dict, extra: list[str]) -> dict:
    Path(run["out_dir"]).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ugt.cli", "train", "--config", run["config"], "--out-dir", run["out_dir"],
           "--quiet", "--set", f"name={run['name']}"]
    for s in run["sets"] + extra:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    with open(Path(run["out_dir"]) / "stdout.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    print(f"[{time.strftime('%H:%M:%S')}] {run['name']}: rc={rc} in {time.time() - start:.0f}s", flush=True)
    return {**run, "rc": rc}


def collect(run: dict) -> dict | None:
    path = Path(run["out_dir"]) / "summary.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    t = s["test"]
    row = {"model": run["label"], "split": run["split"], **{k: round(t[k], 4) for k in COLUMNS if k in t},
           "train_minutes": round(s.get("train_minutes", 0.0), 2), "best_epoch": s.get("best_epoch"),
           "valid_ndcg@10": round(s.get("valid", {}).get("ndcg@10", float("nan")), 4),
           "beyond": {k: round(t[k], 4) for k in ("ild", "genre_diversity", "entropy", "novelty",
                                                 "long_tail_share", "coverage", "gini") if k in t}}
    if "generative" in t:
        row["generative"] = {k: round(v, 4) for k, v in t["generative"].items()}
    if "target_aware" in t:  # the same checkpoint, retrieval's top N reordered by the ranking head
        row["target_aware"] = {k: round(v, 4) for k, v in t["target_aware"].items()}
    if "dpo" in s:
        row["dpo"] = s["dpo"]
        row["best_stage"] = s.get("best_stage")
    if "compile_fallback" in s:
        row["compile_fallback"] = s["compile_fallback"]
    row["parameters"] = s.get("parameters")
    return row


def markdown(rows: list[dict]) -> str:
    headers = ["model", "ties", "HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@200", "NDCG@200", "MRR",
               "paper HR@10 / NDCG@10", "minutes"]
    table = []
    key_of = {v: k for k, v in LABELS.items()}
    for r in rows:
        anchor = ANCHORS.get(key_of.get(r["model"], ""), TARGETS.get(key_of.get(r["model"], "")))
        anchor_s = f"{anchor[0]:.4f} / {anchor[1]:.4f}" if anchor else ""
        if key_of.get(r["model"]) in TARGETS:
            anchor_s = f"target >= {anchor[0]:.3f} / {anchor[1]:.3f}"
        cells = [f"{r.get(k, float('nan')):.4f}" for k in COLUMNS]
        table.append([r["model"], r["split"], *cells, anchor_s, f"{r['train_minutes']:.1f}"])
        if "target_aware" in r:
            ta = r["target_aware"]
            cells = [f"{ta.get(k, float('nan')):.4f}" for k in COLUMNS]
            table.append([f"{r['model']} + ranking head (top {ta['rerank_top']})", r["split"], *cells,
                          "same checkpoint", ""])
    return markdown_table(table, headers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    runs = plan(args)
    if not args.collect_only:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(lambda r: launch(r, args.set), runs))
    rows = [row for row in (collect(r) for r in runs) if row is not None]
    missing = [r["name"] for r in runs if collect(r) is None]
    conditions = {"dataset": "ml-1m", "protocol": "HSTU: leave-one-out by time, full ranking over all 3,883 "
                  "catalog items, items of the input window masked", "device": device_name(), "overrides": args.set}
    write_result(args.out, "ml1m_quality", conditions, {"rows": rows, "missing": missing}, argv, PROG)
    print(markdown(rows))
    if missing:
        print(f"missing runs (see {args.runs_dir}/<name>/stdout.log): {missing}")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
