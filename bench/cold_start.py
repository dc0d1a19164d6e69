"""Cold start on ML-1M: how well items that arrive after training are recommended, in the HSTU protocol.

The items released in 2000 (156 of 3,883; the targets of 809 of 6,040 test users) are treated as new: each run
below is one `ugt train` of models/configs/ugt_ml1m.yaml, side by side in one harness.

* ``trained_on_all`` (the anchor): the model sees those items' events, as if it had been retrained after they
  arrived. The report only splits its test rows by target.
* ``new_items``: the items' events are removed from training, they are never softmax negatives, and their ID
  rows stay zero, so validation and test score them by semantic ID + genres + decade, exactly as the serving
  live catalog scores items the item job codes after training (docs/SERVING.md, "New items without a retrain").
* ``new_items+id_dropout``: the same, trained with ``embedding.id_dropout`` (each item occurrence embedded
  without its ID row with that probability), so the semantic-ID part learns to stand in for a missing ID.
* ``new_items+<variant>`` (``--variants``): the same with more overrides, e.g. ``freshness``: the item-age logit term
  with young items trained ID-less (models/ugt/freshness.py).
* ``<held-out run>+stream_k<K>_c<GAMMA>`` (``--stream K:GAMMA,...``): no training; the run's checkpoint with its new
  items scored by their stream vectors (models/ugt/stream_items.py, bench/cold_stream.py): the mean user state
  before each of their events on the days before the request's, blended with the content vector (serving does the
  same, serving/live_stream.py).
* ``popularity`` and ``content_knn``: untrained anchors on the same test rows (bench/cold_anchors.py).

The result file also carries issue #22's headline keys: ``cold_item_hr@10`` / ``cold_item_hr@200`` / ``warm_hr@10``
of the ``--headline`` row (default: with ``--stream``, the row chosen on the validation rows, ``pick_on_valid``; else
the last variant), ``warm_hr@10_loss`` against ``new_items`` (the same model
without the change), the anchors' ``*_cold_item_hr@10``, and the new-user keys of ``--new-users``
(bench/results/new_users.json, written by bench/new_users.py) when that file exists.

Without the live catalog those items cannot be recommended at all: their HR is 0 by construction.
Test metrics: full ranking over every catalog item (new ones included), input-window items masked.

    python bench/cold_start.py --set max_minutes=6          # table to stdout, bench/results/cold_start.json
    # on one GPU with no network (bench/gpu_ml1m.sh unpacks the carried .ugtdata/; about 8 minutes in all; its
    # $OUT/cold_start.json is bench/results/cold_start.json):
    UGT_COMMIT=<sha> BENCH_TIMEOUT=470 BENCH_SCRIPT=bench/cold_start.py bash bench/gpu_ml1m.sh --id-dropout "" \
        --variants freshness_recent --stream 128:0.7,256:0.5,256:0.7,512:0.7,1024:0.7 --parallel 4 \
        --set max_minutes=4.5 --set "semantic_ids={artifact: .ugtdata/sid/ml1m}"
    # the CI-size run on CPU (ML-100K, the 1997 releases as new items; a few minutes):
    python bench/cold_start.py --config models/configs/ugt_ml100k_tiny.yaml --cold "{year_from: 1997}" \
        --id-dropout "" --variants freshness_recent --stream 128:0.7,256:0.5,512:0.7 --out /tmp/cold.json
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

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (bench/gpu_ml1m.sh): the repo's packages importable
    sys.path.insert(0, str(REPO))
from bench.cold_anchors import anchors  # noqa: E402
from bench.common import markdown_table, write_result  # noqa: E402
from bench.quality_runs import device_name  # noqa: E402

PROG = "python bench/cold_start.py"

METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "mrr")
# the variants this bench knows by name (--variants NAME expands to NAME:<these overrides>)
KNOWN_VARIANTS = {
    "freshness": "model_config.freshness.enabled=true;model_config.freshness.idless_share=0.5",
    "freshness_no_idless": "model_config.freshness.enabled=true",
    "freshness_recent": "model_config.freshness.enabled=true;model_config.freshness.idless_share=0.5;"
                        "model_config.freshness.recent_days=7",
    # every item (not only the young ones) goes ID-less for a share of the steps, in inputs and output rows alike
    "composed_recent": "model_config.freshness.enabled=true;model_config.freshness.idless_share=0.2;"
                       "model_config.freshness.young_years=1000;model_config.freshness.recent_days=7",
}
NEW_USER_KEYS = ("new_user_hr@10_after_1", "new_user_hr@10_after_3", "new_user_hr@10_after_5",
                 "popularity_new_user_hr@10_after_5")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="models/configs/ugt_ml1m.yaml", help="the UGT config every run starts from")
    p.add_argument("--cold", default="{year_from: 2000}", help="cold_items spec (YAML; models.data.cold_item_mask)")
    p.add_argument("--id-dropout", default="0.2", help="comma list: one new_items+id_dropout run per value")
    p.add_argument("--variants", default="", help="more held-out runs NAME:KEY=VALUE;KEY=VALUE (comma list), e.g. "
                   "content_tower:model_config.embedding.content_tower=true;model_config.embedding.id_dropout=0.5; "
                   f"a bare NAME of {sorted(KNOWN_VARIANTS)} takes its known overrides")
    p.add_argument("--stream", default="", help="comma list K:GAMMA[:SCALE]: each held-out run's checkpoint is also "
                   "scored with its new items' stream vectors (models/ugt/stream_items.py; blend count K, share GAMMA "
                   "of the mean state taken out, row length SCALE, default 1), one row "
                   "<run>+stream_k<K>_c<GAMMA>[_s<SCALE>] each (bench/cold_stream.py)")
    p.add_argument("--headline", default="", help="the row whose numbers are the headline keys (default: with "
                   "--stream, the held-out row chosen on validation (pick_on_valid); else the last variant, else "
                   "new_items)")
    p.add_argument("--no-anchors", action="store_true", help="skip the popularity and content-kNN anchors")
    p.add_argument("--new-users", default="bench/results/new_users.json",
                   help="bench/new_users.py's result, whose new-user keys are copied into this result (if it exists)")
    p.add_argument("--print-variant", default="", help="print a known variant's NAME:OVERRIDES and exit")
    p.add_argument("--parallel", type=int, default=4, help="runs at once (they share one GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--runs-dir", default="runs/cold_start")
    p.add_argument("--out", default="bench/results/cold_start.json")
    p.add_argument("--collect-only", action="store_true", help="only gather existing summaries")
    p.add_argument("--skip-done", action="store_true", help="do not rerun runs whose summary.json exists")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[dict]:
    cold = args.cold.strip().rstrip("}")
    runs = [{"name": "trained_on_all", "sets": [f"cold_items={cold}, holdout: false}}"]},
            {"name": "new_items", "sets": [f"cold_items={args.cold}"]}]
    for p in [v for v in args.id_dropout.split(",") if v]:
        runs.append({"name": f"new_items+id_dropout_{p}",
                     "sets": [f"cold_items={args.cold}", f"model_config.embedding.id_dropout={p}"]})
    for spec in [v for v in args.variants.split(",") if v]:
        name, _, sets = spec.partition(":")
        sets = sets or KNOWN_VARIANTS.get(name, "")
        if not sets:
            raise SystemExit(f"variant {name!r} has no overrides and is not one of {sorted(KNOWN_VARIANTS)}")
        runs.append({"name": f"new_items+{name}", "sets": [f"cold_items={args.cold}", *sets.split(";")]})
    for run in runs:  # the fields launch reads
        run.update(config=args.config, out_dir=f"{args.runs_dir}/{run['name']}",
                   sets=[f"name=cold-{run['name']}", "dpo.enabled=false", *run["sets"]])
    return runs


def launch(run: dict, extra: list[str]) -> dict:
    """One `ugt train` of ``run`` (its config, out_dir and --set overrides), logged to <out_dir>/stdout.log."""
    Path(run["out_dir"]).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ugt.cli", "train", "--config", run["config"], "--out-dir", run["out_dir"],
           "--quiet", "--set", f"name={run['name']}"]
    for item in run["sets"] + extra:
        cmd += ["--set", item]
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
    row = {"run": run["name"], "cold_items": s.get("cold_items"), "best_epoch": s.get("best_epoch"),
           "train_minutes": round(s.get("train_minutes", 0.0), 2)}
    for part in ("test", "test_cold", "test_warm", "valid_cold", "valid_warm"):
        if part in s:
            row[part] = {"users": s[part]["users"], **{k: round(s[part][k], 4) for k in METRICS}}
            if "generative" in s[part]:
                row[part]["generative_hr@10"] = round(s[part]["generative"]["hr@10"], 4)
            for quota, acc in s[part].get("new_item_quota", {}).items():
                row[part][f"quota_{quota}"] = {k: round(acc[k], 4) for k in ("hr@10", "ndcg@10")}
    for quota, acc in s.get("test_quota", {}).items():
        row["test"][f"quota_{quota}"] = {k: round(acc[k], 4) for k in ("hr@10", "ndcg@10")}
    return row


def stream_rows_of(runs: list[dict], done: list[str], specs: str) -> list[dict]:
    """bench/cold_stream.py's rows for every finished held-out run, one per K:GAMMA[:SCALE[:BACKGROUND]] of
    ``specs``."""
    import torch

    from bench.cold_stream import stream_rows

    parsed = [tuple(float(v) for v in spec.split(":")) for spec in specs.split(",") if spec]
    if any(len(p) not in (2, 3, 4) for p in parsed):
        raise SystemExit(f"--stream wants K:GAMMA, K:GAMMA:SCALE or K:GAMMA:SCALE:BACKGROUND, got {specs!r}")
    parsed = [p if len(p) >= 3 else (*p, 1.0) for p in parsed]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for run in runs:
        if run["name"].startswith("new_items") and run["name"] in done:
            out += stream_rows(run["out_dir"], run["name"], parsed, device)
            print(f"[{time.strftime('%H:%M:%S')}] {run['name']}: stream rows", flush=True)
    return out


def markdown(rows: list[dict]) -> str:
    headers = ["run", "all: HR@10", "NDCG@10", "new-item targets: HR@10", "NDCG@10", "HR@50", "HR@200",
               "other targets: HR@10", "NDCG@10", "minutes", "valid: new-item HR@10", "other HR@10"]
    cells = []
    for r in rows:
        a, c, w = r["test"], r.get("test_cold", {}), r.get("test_warm", {})
        values = (a["hr@10"], a["ndcg@10"], c.get("hr@10", 0), c.get("ndcg@10", 0), c.get("hr@50", 0),
                  c.get("hr@200", 0), w.get("hr@10", 0), w.get("ndcg@10", 0))
        minutes = f"{r['train_minutes']:.1f}" if "train_minutes" in r else ""
        valid = [f"{r[p]['hr@10']:.4f}" if p in r else "" for p in ("valid_cold", "valid_warm")]
        cells.append([r["run"], *(f"{v:.4f}" for v in values), minutes, *valid])
    for r in rows:
        for quota in [k for k in r["test"] if k.startswith("quota_") and k in r.get("test_cold", {})]:
            a, c, w = r["test"][quota], r["test_cold"][quota], r["test_warm"][quota]
            cells.append([f"{r['run']}, {quota[6:].replace('_', ' ')} slots kept for new items",
                          *(f"{v:.4f}" for v in (a["hr@10"], a["ndcg@10"], c["hr@10"], c["ndcg@10"])), "", "",
                          f"{w['hr@10']:.4f}", f"{w['ndcg@10']:.4f}", "", "", ""])
    lines = [markdown_table(cells, headers)]
    if rows and "test_cold" in rows[0]:
        lines.append(f"\n(new-item targets: {rows[0]['test_cold']['users']:,} test users; other targets: "
                     f"{rows[0]['test_warm']['users']:,}; without the live catalog the new items' HR is 0)")
    return "\n".join(lines)


def pick_on_valid(rows: list[dict], budget: float = 0.005) -> str:
    """The held-out row with the best new-item HR@10 on the VALIDATION rows among those whose other targets lose at
    most ``budget`` HR@10 there against ``new_items`` (issue #22's warm budget); none within it: the row losing
    the least. Test rows never take part."""
    base = next((r for r in rows if r["run"] == "new_items" and "valid_warm" in r), None)
    held = [r for r in rows if r["run"].startswith("new_items") and "valid_cold" in r]
    if base is None or not held:
        return ""
    loss = {r["run"]: base["valid_warm"]["hr@10"] - r["valid_warm"]["hr@10"] for r in held}
    within = [r for r in held if loss[r["run"]] <= budget]
    if within:
        return max(within, key=lambda r: (r["valid_cold"]["hr@10"], r["valid_cold"]["hr@200"]))["run"]
    return min(held, key=lambda r: loss[r["run"]])["run"]


def headline(rows: list[dict], name: str, new_users: Path) -> dict:
    """Issue #22's keys: the ``name`` row's cold / warm HR, its warm loss against ``new_items``, the anchors' cold
    HR, and the new-user keys of bench/new_users.py's result file."""
    by_run = {r["run"]: r for r in rows}
    out: dict = {}
    if name in by_run and "test_cold" in by_run[name]:
        row = by_run[name]
        out.update({"headline_run": name, "cold_item_hr@10": row["test_cold"]["hr@10"],
                    "cold_item_hr@200": row["test_cold"]["hr@200"], "warm_hr@10": row["test_warm"]["hr@10"]})
        if "new_items" in by_run:
            out["warm_hr@10_loss"] = round(by_run["new_items"]["test_warm"]["hr@10"] - row["test_warm"]["hr@10"], 4)
    for run, prefix in (("new_items", "without_change"), ("trained_on_all", "retrained"),
                        ("popularity", "popularity"), ("content_knn", "content_knn")):
        if run in by_run and "test_cold" in by_run[run]:
            r = by_run[run]
            out.update({f"{prefix}_cold_item_hr@10": r["test_cold"]["hr@10"],
                        f"{prefix}_cold_item_hr@200": r["test_cold"]["hr@200"],
                        f"{prefix}_warm_hr@10": r["test_warm"]["hr@10"]})
    if new_users.is_file():
        users = json.loads(new_users.read_text())
        out.update({k: users[k] for k in NEW_USER_KEYS if k in users})
        out["new_users_from"] = f"{new_users} (commit {users.get('commit', '?')}, {users.get('date', '?')})"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_variant:
        print(f"{args.print_variant}:{KNOWN_VARIANTS[args.print_variant]}")
        return 0
    os.chdir(REPO)
    runs = plan(args)
    if not args.collect_only:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(lambda r: launch(r, args.set), [r for r in runs if not (args.skip_done and collect(r))]))
    rows = [row for row in (collect(r) for r in runs) if row is not None]
    missing = [r["name"] for r in runs if collect(r) is None]
    stream_error = None
    if args.stream:
        try:  # like the anchors: a failure here must not lose the trained rows
            rows += stream_rows_of(runs, [r["run"] for r in rows], args.stream)
        except Exception as exc:
            stream_error = f"{type(exc).__name__}: {exc}"[:500]
            print(f"stream rows failed: {stream_error}", file=sys.stderr)
    cold_spec = {k: v for k, v in yaml.safe_load(args.cold).items() if k != "holdout"}
    anchor_error = None
    if not args.no_anchors:
        try:  # the trained rows are the expensive part: an anchor that fails must not lose them
            rows += [{**a, **{p: {k: round(v, 4) if isinstance(v, float) else v for k, v in a[p].items()}
                              for p in ("test", "test_cold", "test_warm")}}
                     for a in anchors(args.config, cold_spec, args.set)]
        except Exception as exc:
            anchor_error = f"{type(exc).__name__}: {exc}"[:500]
            print(f"anchors failed: {anchor_error}", file=sys.stderr)
    variants = [r["name"] for r in runs if r["name"].startswith("new_items+")]
    chosen = args.headline or (pick_on_valid(rows) if args.stream else "") or (variants[-1] if variants else
                                                                               "new_items")
    top = headline(rows, chosen, Path(args.new_users))
    conditions = {"config": args.config, "cold": args.cold, "runs": {r["name"]: r["sets"] for r in runs},
                  "protocol": "HSTU: leave-one-out by time, full ranking over the whole catalog (new items "
                              "included), items of the input window masked; new items scored without an ID row, by "
                              "semantic ID + metadata (+ the freshness term where a run enables it)",
                  "device": device_name(), "overrides": args.set,
                  "headline_rule": "--headline" if args.headline else ("best new-item HR@10 on the validation rows "
                                   "within a 0.005 warm HR@10 loss on them (pick_on_valid)" if args.stream else
                                   "the last variant")}
    results = {**top, "rows": rows, "missing": missing, **({"anchor_error": anchor_error} if anchor_error else {}),
               **({"stream_error": stream_error} if stream_error else {})}
    write_result(args.out, "cold_start", conditions, results, argv, PROG)
    print(markdown(rows))
    if missing:
        print(f"missing runs (see {args.runs_dir}/<name>/stdout.log): {missing}")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
