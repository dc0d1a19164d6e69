"""An `engine_scope: model` HTTP worker's CPU per request by stage, at ML-1M length and at the industrial history
(1,024 events), for a baseline tree and this one, in one run.

The GPU host's e2e bench measured 1.885 ms of worker CPU per request at the industrial size against ~0.5 ms at ML-1M
size (bench/results/serving_gpu_e2e_industrial.json, serving_gpu_e2e.json): something in the worker scaled with the
history. This bench runs bench/worker_stages.py (the service's batch pipeline in one thread: state read and decode,
history sets, the UGT rows, the packed rows and the frame, the answer; the engine a stand-in) with each tree's own
code, on synthetic users (bench/e2e_users.py ``synthetic_users``, ``history - 64`` events) stored in a private Redis,
for each history length, each tree in ``--passes`` interleaved subprocesses (the order alternating, so a slow spell
of the machine hits both). The checkpoints are random-weight UGTs of each history (bench/e2e_industrial.py; 1 layer,
d = 64, ``--items`` items): the worker never runs the model, and its code path is the same as with the 1M-item
model's (a vocabulary dict and rows of the same width). Per history, kind (miss, hit, append) and stage: each
tree's median over the passes, and this tree's over the baseline's; the 10/20/70 % miss/hit/append mix of the GPU
bench weights the kinds.

  python -m bench.worker_cpu_industrial --baseline b01720d --passes 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, result_path
from bench.serving import start_redis
from bench.worker_cpu import extract, probe, run_and_write

MIX = {"miss": 0.1, "hit": 0.2, "append": 0.7}  # bench/serving_gpu_e2e.py's default traffic mix
STAGES_CODE = (REPO / "bench" / "worker_stages.py").read_text()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.worker_cpu_industrial", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="HEAD", help="git revision of the baseline tree (default: %(default)s)")
    p.add_argument("--histories", default="200,1024", help="history lengths (the model's window), comma list")
    for flag, default, what in (("--users", 512, "synthetic users per probe"),
                                ("--batch", 32, "requests per worker batch"),
                                ("--rounds", 3, "rounds of miss, hit, append per probe (the best kept)"),
                                ("--passes", 5, "interleaved probe subprocesses per tree and history"),
                                ("--items", 50_000, "catalog size of the random checkpoints")):
        p.add_argument(flag, type=int, default=default, help=what)
    p.add_argument("--redis-port", type=int, default=None, help="the private Redis's port (default: a free one)")
    p.add_argument("--out", default=str(result_path("worker_cpu_probes_industrial")),
                   help="result file (default: %(default)s)")
    return p.parse_args(argv)


def mixed(stages: dict[str, dict[str, float]], key: str = "cpu_us") -> float:
    """The traffic mix's mean of ``key`` over the kinds."""
    return sum(share * stages[kind].get(key, 0.0) for kind, share in MIX.items())


def summary(rows: list[dict[str, Any]], names: tuple[str, str]) -> list[dict[str, Any]]:
    """Per history, kind and stage: each tree's median over the passes (µs per request), and current / baseline."""
    out = []
    for history in sorted({r["history"] for r in rows}):
        mine = [r for r in rows if r["history"] == history]
        for kind in (*MIX, "mix"):
            kinds = tuple(MIX) if kind == "mix" else (kind,)
            stages = sorted({s for r in mine for k in kinds for s in r["stages"][k]})
            for stage in stages:
                med = {}
                for name in names:
                    got = [(mixed(r["stages"], stage) if kind == "mix" else r["stages"][kind].get(stage))
                           for r in mine if r["config"] == name]
                    got = [g for g in got if g is not None]
                    med[name] = round(statistics.median(got), 2) if got else None
                base, new = med[names[0]], med[names[1]]
                out.append({"history": history, "kind": kind, "stage": stage, f"{names[0]}_us": base,
                            f"{names[1]}_us": new, "ratio": round(new / base, 3) if base and new is not None else None})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.e2e_industrial import write_industrial_checkpoint

    workdir = Path(tempfile.mkdtemp(prefix="ugt-worker-industrial-"))
    base_tree, base_commit = extract(args.baseline, workdir / "baseline-tree")
    histories = [int(h) for h in args.histories.split(",") if h]
    checkpoints = {h: write_industrial_checkpoint(workdir / f"h{h}" / "last.pt", items=args.items, layers=1, dim=64,
                                                  history=h) for h in histories}
    redis_proc, redis_port = start_redis(workdir, args.redis_port)
    names = ("baseline", "current")
    trees = dict(zip(names, (base_tree, REPO), strict=True))
    rows: list[dict[str, Any]] = []
    try:
        for i in range(args.passes):
            for history in histories:
                order = names if (i + history) % 2 == 0 else names[::-1]
                for name in order:
                    got = probe(STAGES_CODE, trees[name], str(checkpoints[history]), str(redis_port), str(args.users),
                                str(args.batch), str(args.rounds))
                    row = {"config": name, "pass": i, **got, "load_average": [round(x, 2) for x in os.getloadavg()]}
                    row["stages"]["mix"] = {"cpu_us": round(mixed(got["stages"]), 2)}
                    rows.append(row)
                    print(f"pass {i} history {history} {name}: mix {row['stages']['mix']['cpu_us']:.1f} µs/request "
                          f"(load {row['load_average'][0]})", flush=True)
    finally:
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)  # the baseline tree and the checkpoints
    return {"baseline_commit": base_commit, "rows": rows, "summary": summary(rows, names)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = {k: v for k, v in vars(args).items() if k != "out"}
    conditions["mix"] = MIX
    conditions["measured"] = (
        "each tree's code in its own subprocess (bench/worker_stages.py) on the same Redis: RecommendService.run_batch "
        "in one thread with a RemoteModel whose engine is a stand-in (a fixed top-k per frame); cpu_us: thread CPU per "
        "request of the batch calls, the other stages wall time per request (perf_counter around the tree's own "
        "functions; gather includes gather_prepare, which includes gather_fingerprint; state_read includes "
        "state_decode); per kind the best of --rounds rounds, then the median over --passes subprocesses per tree")
    return run_and_write(args, "worker_cpu_industrial", conditions, run,
                         lambda result: [r for r in result["summary"] if r["stage"] == "cpu_us"])


if __name__ == "__main__":
    raise SystemExit(main())
