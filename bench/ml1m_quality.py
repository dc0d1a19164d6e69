"""ML-1M quality table, from a clean clone: fair baselines, UGT ablations, DPO, seeds, both tie orders.

One command, four steps (the row matrix: bench/quality_rows.py; the runs folder: bench/quality_runs.py; the
report: bench/quality_report.py):

    python -m bench.ml1m_quality stage      # here (CPU): the dataset + semantic IDs into .ugtdata/ (carried)
    python -m bench.ml1m_quality plan       # the rows, their estimated minutes, and which are done
    bash bench/gpu_ml1m.sh --parallel 8     # on the GPU machine: `run` until the call's deadline, then pack
    python -m bench.ml1m_quality unpack DIR # here: the returned runs folder back into .ugtdata/ for the next call
    python -m bench.ml1m_quality collect    # bench/results/ml1m_quality.json and docs/RESULTS.md's tables

`run` starts each unfinished row as a `ugt train` subprocess (several share the GPU), resuming those that have a
last.pt; each stops cleanly before the deadline and the next call continues it. `--only` / `--rows-from` split the
matrix across calls. `--dataset ml-100k --tiny` is the same pipeline at CPU size (the CI test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repo's packages importable
    sys.path.insert(0, str(REPO))
from bench import quality_report, quality_runs  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from bench.quality_rows import TINY_SEMANTIC_IDS, matrix, select  # noqa: E402

PROG = "python -m bench.ml1m_quality"
STAGE_DIR = Path(".ugtdata")
PROTOCOL = ("leave-one-out by time (last event = test, the one before = validation for early stopping), full "
            "ranking over every catalog item, items of the 200-event input window masked")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-1m", help="ml-1m (the table) or ml-100k")
    p.add_argument("--tiny", action="store_true", help="the CPU-sized matrix (CI): few users, tiny models, 3 epochs")
    p.add_argument("--stage-dir", default=str(STAGE_DIR), help="the carried folder (ignored by git)")
    p.add_argument("--runs-dir", help="default <stage-dir>/quality-<dataset>[-tiny]")
    p.add_argument("--only", default="", help="comma list of row names or prefixes (e.g. ugt+,sasrec-paper)")
    p.add_argument("--rows-from", default="", help="a file of row names or prefixes, one a line")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="<stage|plan|run|pack|unpack|collect>")
    stage = sub.add_parser("stage", help="fetch the dataset if needed and stage it (+ semantic IDs) for the GPU")
    plan = sub.add_parser("plan", help="print the rows, their estimated minutes and which are done")
    run = sub.add_parser("run", help="run the unfinished rows until --deadline-s, then pack (GPU machine)")
    pack = sub.add_parser("pack", help="tar the runs folder into parts a device call can return")
    unpack = sub.add_parser("unpack", help="restore the runs folder from a device call's returned parts")
    collect = sub.add_parser("collect", help="write the result JSON and the generated part of docs/RESULTS.md")
    for sp in (stage, plan, run, pack, unpack, collect):
        add_common(sp)
    run.add_argument("--parallel", type=int, default=8, help="rows at once (they share one GPU)")
    run.add_argument("--deadline-s", type=float, default=float(os.environ.get("BENCH_DEADLINE", 0)) or None,
                     help="seconds this call may run (env BENCH_DEADLINE); rows stop and save before it")
    run.add_argument("--reserve-s", type=float, default=75.0,
                     help="seconds before the deadline at which a row stops training (its test eval and exit)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    for sp in (run, pack):
        sp.add_argument("--pack-to", default="", help="folder for the runs tarball parts (the GPU script: $OUT)")
        sp.add_argument("--pack-mib", type=float, default=48.0,
                        help="most MiB the packed runs may take (the next call carries them; 64 MiB in all)")
    unpack.add_argument("parts_dir", help="the folder holding <runs>.tgz.NN (the device call's files)")
    collect.add_argument("--out", help="default bench/results/ml1m_quality.json (ml-1m) or <runs-dir>.json")
    collect.add_argument("--results-md", help="markdown page with the generated section (default docs/RESULTS.md "
                         "for ml-1m, none otherwise)")
    args = p.parse_args(argv)
    args.argv = argv
    cwd = Path.cwd()  # paths given on the command line are the caller's; the stage dir is the repo root's
    for key in ("runs_dir", "out", "results_md", "parts_dir", "rows_from", "pack_to"):
        if getattr(args, key, None):
            setattr(args, key, str(cwd / getattr(args, key)))
    suffix = f"{args.dataset.replace('-', '')}{'-tiny' if args.tiny else ''}"
    args.runs_dir = Path(args.runs_dir or f"{args.stage_dir}/quality-{suffix}")
    args.semantic_ids = f"{args.stage_dir}/sid/{suffix}"
    return args


def rows_of(args: argparse.Namespace) -> list:
    rows = matrix(args.semantic_ids, tiny=args.tiny)
    if args.dataset != ("ml-100k" if args.tiny else "ml-1m"):
        rows = [replace(r, sets=(*r.sets, f"dataset={args.dataset}")) for r in rows]
    return select(rows, args.only, args.rows_from)


def stage(args: argparse.Namespace) -> int:
    """The dataset from the CPU path's cache (fetched if missing) as one tarball, and the semantic-ID artifact the
    UGT rows read, built by the project's stage 1 with the UGT config's own build settings."""
    import yaml

    from contracts.datasets import fetch_dataset
    from models.semantic_ids import stage1

    folder = fetch_dataset(args.dataset)
    target = Path(args.stage_dir) / "datasets" / f"{args.dataset}.tgz"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:  # what `ugt data fetch` cached, less the derived events/
        for path in sorted(folder.iterdir()):
            if path.name != "events":
                tar.add(path, arcname=f"{args.dataset}/{path.name}")
    print(f"stage: {folder} -> {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    if any(r.model == "ugt" and "semantic_ids={}" not in r.sets for r in rows_of(args)):
        ugt = yaml.safe_load((REPO / "models/configs/ugt_ml1m.yaml").read_text())
        build = TINY_SEMANTIC_IDS if args.tiny else (ugt.get("semantic_ids") or {}).get("build", {})
        artifact = stage1(args.dataset, build, args.semantic_ids, dataset=args.dataset)
        size = sum(p.stat().st_size for p in Path(args.semantic_ids).rglob("*") if p.is_file())
        print(f"stage: semantic IDs {list(artifact.codebook_sizes)} -> {args.semantic_ids} ({size / 2**20:.1f} MiB)")
    total = sum(p.stat().st_size for p in Path(args.stage_dir).rglob("*") if p.is_file())
    print(f"stage: {args.stage_dir} holds {total / 2**20:.1f} MiB (a device call carries 64 MiB in all)")
    return 0


def plan(args: argparse.Namespace) -> int:
    from bench.quality_rows import row_config

    table = []
    for row in rows_of(args):
        st = quality_runs.status(args.runs_dir / row.name)
        cfg = row_config(row)
        table.append({"row": row.name, "recipe": row.recipe, "ties": row.tie_order, "seed": row.seed,
                      "epochs": f"{cfg['max_epochs']} (patience {cfg['patience']})", "est. min": row.minutes,
                      "status": st["state"] + (f" @ epoch {st['epoch']}" if st["state"] == "resumable" else ""),
                      "calls": st["calls"], "minutes": st["minutes"]})
    print_table(table)
    left = [t for t in table if not t["status"].startswith("done")]
    print(f"\n{len(table)} rows, {len(table) - len(left)} done; about {sum(t['est. min'] for t in left):.0f} "
          "GPU-minutes left if run alone (rows sharing a GPU take longer each)")
    return 0


def run(args: argparse.Namespace) -> int:
    outcomes = quality_runs.run_rows(rows_of(args), args.runs_dir, args.parallel, args.deadline_s, args.reserve_s,
                                     args.set, args.pack_mib)
    print(json.dumps(outcomes, indent=1))
    if args.pack_to:
        quality_runs.pack(args.runs_dir, Path(args.pack_to), args.pack_mib)
    plan(args)
    return 0 if all(o == "finished" for o in outcomes.values()) else 3


def collect(args: argparse.Namespace) -> int:
    rows = [quality_report.result_row(r, args.runs_dir / r.name) for r in rows_of(args)]
    commits = sorted({c for r in rows for c in r["commits"]})
    if len(commits) == 1 and not os.environ.get("UGT_COMMIT"):
        os.environ["UGT_COMMIT"] = commits[0]  # the code the rows ran, not this checkout's later HEAD
    devices = sorted({d for r in rows for d in r["devices"]})
    conditions = {"dataset": args.dataset + (" (tiny: first 150 users, tiny models)" if args.tiny else ""),
                  "protocol": PROTOCOL, "devices": devices, "run_commits": commits,
                  "sharing": "rows ran as parallel `ugt train` processes sharing one device, so minutes are "
                             "wall-clock under sharing; `machine` is where collect ran",
                  "primary_tie_order": "stable"}
    default_out = "bench/results/ml1m_quality.json" if args.dataset == "ml-1m" and not args.tiny else \
        f"{args.runs_dir}.json"
    out = Path(args.out or default_out)
    write_result(out, "ml1m_quality", conditions, {"rows": rows, "groups": quality_report.groups(rows)},
                 args.argv, PROG if args.argv is not None else None)
    md = args.results_md or ("docs/RESULTS.md" if args.dataset == "ml-1m" and not args.tiny else None)
    if md:
        quality_report.splice(Path(md), quality_report.render(json.loads(out.read_text()), str(out)))
        print(f"wrote the generated section of {md}")
    missing = [r["name"] for r in rows if not r["finished"]]
    if missing:
        print(f"not finished ({len(missing)}): {', '.join(missing)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    if args.command == "pack":
        quality_runs.pack(args.runs_dir, Path(args.pack_to or "."), args.pack_mib)
        return 0
    if args.command == "unpack":
        quality_runs.unpack(Path(args.parts_dir), args.runs_dir)
        return 0
    return {"stage": stage, "plan": plan, "run": run, "collect": collect}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
