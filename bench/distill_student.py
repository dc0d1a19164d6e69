"""A smaller student distilled from a strong trained teacher (models/distill.py), against that teacher: test HR@10
(the issue's target: >= 95 % of the teacher's) and CPU requests/s (target: >= 3x the teacher's).

The student is the teacher's own training config (dataset, tie order, max_len, long history, loss) with a smaller
shape (``--student``: by default 2 layers of the ML-1M config's block (d = 64, 2 heads, 4 MoE experts of 128,
top-2), items by ID only, no semantic-ID head, so it needs no semantic-ID artifact), DPO off, and ``distill: {teacher: <the checkpoint>}``;
it trains on ``--device`` for ``--minutes`` (the trainer's max_minutes; its best validation state is kept). Then
both models, through the serving engine: HR@10 / NDCG@10 on every test user (the HSTU protocol, as
bench/compression_gpu.py: leave-one-out, full ranking, the input window masked) on ``--device``, and CPU
requests/s (fp32, ``--threads`` torch threads as serving runs, no KV cache: every request a prefill) on the first
``--cpu-users`` test users, best of ``--repeats`` passes with the two engines taking turns.

  python -m bench.distill_student --teacher .ugtdata/teacher/ugt-ml1m-stable-s42-7m.pt --minutes 6   # GPU
  python -m bench.distill_student --teacher ckpt.pt --device cpu --minutes 0.2 --max-users 100        # smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import print_table, result_path, write_result
from bench.compression import throughputs
from bench.compression_gpu import load_pool, quality, top10, window_excludes

PROG = "python -m bench.distill_student"
# the student's shape: model_config keys replaced in the teacher's
STUDENT = {"d_model": 64, "num_layers": 2, "num_heads": 2, "dqk": 32, "dv": 32,
           "moe": {"d_ff": 128, "num_experts": 4, "top_k": 2}, "heads": {"semantic_id": False}}


def student_shape(text: str) -> dict[str, Any]:
    """``--student``: the default shape with ``key=value`` pairs replaced (``d_model=64,num_layers=2,moe.d_ff=128``)."""
    shape = {**STUDENT, "moe": dict(STUDENT["moe"])}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--student {pair!r}: expected key=integer, e.g. d_model=64")
        *parents, leaf = key.strip().split(".")
        if parents not in ([], ["moe"]) or leaf not in (STUDENT["moe"] if parents else STUDENT) or leaf == "heads":
            raise ValueError(f"--student {key!r}: one of {sorted(k for k in STUDENT if k != 'heads')} "
                             f"or moe.{{{','.join(STUDENT['moe'])}}}")
        (shape["moe"] if parents else shape)[leaf] = int(value)
    return shape


def student_config(teacher: Path, args: argparse.Namespace) -> Any:
    """The teacher's TrainConfig with the student's shape, distillation from ``teacher`` and this run's budget."""
    from models.train_config import TrainConfig

    cfg = TrainConfig(**torch.load(teacher, map_location="cpu", weights_only=False)["config"])
    student = args.shape
    shape = {**cfg.model_config, **student, "moe": {**cfg.model_config.get("moe", {}), **student["moe"]},
             "embedding": {**cfg.model_config.get("embedding", {}), "item_repr": "id"}}
    values = {**vars(cfg), "name": f"{cfg.name}-student", "model_config": shape, "semantic_ids": {},
              "contrastive_weight": 0.0, "dpo": {**cfg.dpo, "enabled": False}, "out_dir": args.work_dir,
              "max_minutes": args.minutes, "max_users": args.max_users, "device": args.device, "progress": True,
              "distill": {"teacher": str(teacher), "weight": args.weight, "temperature": args.temperature}}
    if args.max_epochs > 0:
        values["max_epochs"] = args.max_epochs
    return TrainConfig(**values)


def measure(teacher: Path, student: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The teacher's and the student's rows: quality on ``args.device``, CPU requests/s, and the student's ratios."""
    from models.ugt.inference import InferenceConfig, UGTInference

    rows, cpu_engines = [], {}
    for role, path in (("teacher", teacher), ("student", student)):
        pool = load_pool(path, "", args.max_users)
        model, cfg = pool["model"], pool["cfg"]
        engine = UGTInference(model, InferenceConfig(device=args.device, batch_buckets=(512,)))
        vectors = engine.row_vectors(pool["rows"])
        excl = engine.exclusion_matrix(window_excludes(pool["rows"]))
        scores = quality(top10(engine, vectors, excl, 512), pool["targets"])
        del engine
        cpu = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
        subset = pool["rows"][: args.cpu_users]
        cpu_engines[role] = (cpu, cpu.row_vectors(subset), cpu.exclusion_matrix(window_excludes(subset)))
        rows.append({"config": cfg.name, "role": role, "parameters": sum(p.numel() for p in model.parameters()),
                     "shape": {k: cfg.model_config.get(k) for k in ("d_model", "num_layers", "num_heads", "moe")},
                     "weights": pool["weights"], "users": len(pool["rows"]), **scores})
        print(f"[{role}] {cfg.name}: test HR@10 {scores['hr@10']:.4f}", flush=True)
    torch.set_num_threads(args.threads)
    speeds = throughputs({role: parts for role, parts in cpu_engines.items()}, args.batches, args.repeats)
    last = max(args.batches)
    for row in rows:
        row.update({f"cpu_req_s@{b}": round(speeds[row["role"]][b], 1) for b in args.batches})
    teacher_row, student_row = rows
    student_row.update({"hr@10_ratio_vs_teacher": round(student_row["hr@10"] / teacher_row["hr@10"], 4),
                        "cpu_speedup_vs_teacher": round(speeds["student"][last] / speeds["teacher"][last], 3)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the trained teacher: a UGT checkpoint.pt or last.pt")
    p.add_argument("--student", default="", help="the student's shape: key=value pairs replacing the default's "
                   f"(e.g. d_model=64,num_layers=2,moe.d_ff=128; default {STUDENT})")
    p.add_argument("--device", default="cuda", help="where the student trains and both are evaluated")
    p.add_argument("--minutes", type=float, default=5.0, help="the student's training budget (max_minutes)")
    p.add_argument("--max-epochs", type=int, default=0, help="> 0: also stop after this many epochs")
    p.add_argument("--max-users", type=int, default=0, help="only the first N users, training and test (0 = all)")
    p.add_argument("--weight", type=float, default=0.5, help="distill weight: the KL's share of the loss")
    p.add_argument("--temperature", type=float, default=2.0, help="distill temperature")
    p.add_argument("--cpu-users", type=int, default=512, help="test users in each timed CPU pass")
    p.add_argument("--batches", default="1,32", help="CPU batch sizes to time (comma-separated)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (serving's torch_threads: 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed CPU passes; the best counts")
    p.add_argument("--work-dir", default="runs/distill-student", help="where the student's run writes")
    p.add_argument("--out", default=str(result_path("distill_student")), help="result JSON")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    try:
        args.shape = student_shape(args.student)
    except ValueError as exc:
        p.error(str(exc))
    if not Path(args.teacher).is_file():
        p.error(f"--teacher {args.teacher}: no such file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU here (use --device cpu for a smoke run)")
    return args


def main(argv: list[str] | None = None) -> int:
    from models.train import fit

    args = parse_args(argv)
    began = time.perf_counter()
    cfg = student_config(Path(args.teacher), args)
    summary = fit(cfg)
    trained_s = time.perf_counter() - began
    student = Path(args.work_dir) / "checkpoint.pt"
    rows = measure(Path(args.teacher), student, args)
    print_table(rows, ["config", "role", "parameters", "hr@10", "ndcg@10", *[f"cpu_req_s@{b}" for b in args.batches],
                       "hr@10_ratio_vs_teacher", "cpu_speedup_vs_teacher"])
    device = torch.device(args.device)
    conditions = {
        "device": args.device, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "teacher": args.teacher,
        "student_recipe": {"shape": args.shape, "item_repr": "id", "distill": cfg.distill, "max_minutes": args.minutes,
                           "max_epochs": cfg.max_epochs, "max_users": args.max_users, "dpo": False,
                           "contrastive_weight": 0.0, "the rest": "the teacher's training config"},
        "student_training": {"seconds": round(trained_s, 1), "epochs": summary.get("epochs"),
                             "best_epoch": summary.get("best_epoch"), "test_by_eval": summary.get("test")},
        "quality": f"HR@10 / NDCG@10 of the serving engine's top 10 on {args.device} (bf16 on CUDA), every test user: "
                   "leave-one-out, full ranking, input-window items masked",
        "cpu": f"UGTInference on this machine's CPU, fp32, {args.threads} torch thread(s), no KV cache, the first "
               f"{args.cpu_users} test users per pass, best of {args.repeats} passes, engines taking turns",
        "batches": args.batches,
    }
    conditions["wall_seconds"] = round(time.perf_counter() - began, 1)
    write_result(args.out, "distill_student", conditions, {"rows": rows}, argv, PROG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
