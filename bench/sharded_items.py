"""Memory per rank of the sharded item table (``shard_items``), and single-process training throughput.

    python -m bench.sharded_items memory                  # CPU: 1M items x d 256 measured at world 1 and 2 (gloo)
    python -m bench.sharded_items throughput --device cuda --minutes 1.5
                                                          # samples/s of `ugt train` steps: ML-1M and industrial

``memory`` (bench/results/sharded_items_memory.json): per rank, the item table's parameters, gradients and AdamW
moments, and the peak activation of the full-softmax loss (:func:`models.sharded_items.activation_bytes`: the
softmax over the rank's columns and the logits it came from, for all ranks' ``--positions`` supervised positions,
plus the gathered user states and the shard's output vectors), for 1M and 10M items, d = 256, world sizes
1/2/4/8, as the formula gives it; and, where it runs (1M items at world 1 and 2, CPU processes over gloo), as
measured on the real tensors after one AdamW step: the shard, its ``.grad``, the optimizer's state tensors, and
the loss's recorded peak (``models.sharded_items.LAST_LOSS_BYTES``), plus each process's peak resident memory
(``peak_rss_gib``: the whole process, Python and torch included, and freed temporaries). The unsharded DDP figure
is beside it: every rank holds the whole table (4 x V x d x 4 bytes with gradient and moments) and scores its
``positions / world`` rows against all V items.

``throughput`` (bench/results/train_throughput.json): training samples (rows) per second and supervised positions
per second of the stage-2 step (forward, loss, backward, AdamW; bf16 autocast and TF32 on CUDA, eager) in one
process, timed for ``--minutes`` after ``--warmup`` steps: ``ml1m`` (models/configs/ugt_ml1m.yaml's model and loss;
semantic IDs from .ugtdata/sid/ml1m (bench/gpu_stage.sh --data) when there, else items by ID alone, recorded) and ``industrial`` (8 layers,
d = 256, 1M items, history 1,024 as bench/serving_gpu_workloads.py serves it, random full histories, sampled
softmax with 128 negatives: a full softmax over 1M items at 1,024 positions a row is 4 GB of logits per row).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, result_path, write_result  # noqa: E402

GIB = 2**30


def formula_row(items: int, dim: int, world: int, positions: int) -> dict[str, Any]:
    """Bytes per rank from the shapes alone (fp32): sharded, and the unsharded DDP run for comparison."""
    from models.sharded_items import activation_bytes

    block = math.ceil((items + 1) / world)
    table = block * dim * 4
    loss = activation_bytes(positions, block, dim)
    ddp_table = (items + 1) * dim * 4
    ddp_loss = activation_bytes(math.ceil(positions / world), items + 1, dim)  # its rows x all V, the whole table
    return {"items": items, "dim": dim, "world": world, "positions": positions, "source": "formula",
            "params_gib": table / GIB, "grads_gib": table / GIB, "adamw_gib": 2 * table / GIB,
            "loss_peak_gib": loss / GIB, "total_gib": (4 * table + loss) / GIB,
            "ddp_total_gib": (4 * ddp_table + ddp_loss) / GIB}


def _measure_rank(rank: int, world: int, items: int, dim: int, positions: int, port: int, queue: Any) -> None:
    """One process of the measured run: a shard, one sharded-loss step with AdamW, its tensors' bytes."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from models import sharded_items as sh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    group = sh.ShardGroup(items + 1, rank, world)
    weight = torch.nn.Parameter(torch.randn(group.block, dim, generator=gen) * 0.02)
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    mine = positions // world
    user = F.normalize(torch.randn(mine, dim, generator=gen), dim=-1).requires_grad_()
    targets = torch.randint(1, items + 1, (mine,), generator=gen)
    ids = torch.arange(group.offset, group.offset + group.block)
    started = time.perf_counter()
    loss = sh.sharded_softmax_loss(user, targets, F.normalize(weight, dim=-1), ids, group, 0.05)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    nbytes = weight.numel() * weight.element_size()
    row = {"items": items, "dim": dim, "world": world, "positions": positions, "source": "measured", "rank": rank,
           "params_gib": nbytes / GIB, "grads_gib": weight.grad.numel() * weight.grad.element_size() / GIB,
           "adamw_gib": state / GIB, "loss_peak_gib": sh.LAST_LOSS_BYTES["peak"] / GIB,
           "step_seconds": seconds, "loss": float(loss.detach())}
    row["total_gib"] = row["params_gib"] + row["grads_gib"] + row["adamw_gib"] + row["loss_peak_gib"]
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # the whole process
    queue.put(row)
    dist.destroy_process_group()


def measure(items: int, dim: int, world: int, positions: int, port: int) -> list[dict[str, Any]]:
    """Every rank's measured row (processes spawned here, gloo on ``port``)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_measure_rank, args=(r, world, items, dim, positions, port, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return sorted(rows, key=lambda r: r["rank"])


def run_memory(args: argparse.Namespace) -> None:
    rows = [formula_row(v, args.dim, w, args.positions) for v in (1_000_000, 10_000_000) for w in (1, 2, 4, 8)]
    for world in args.measure_worlds:  # measured, beside the formula at the same shape
        print(f"measuring {args.measure_items:,} items at world {world} ...", flush=True)
        rows.append(formula_row(args.measure_items, args.dim, world, args.measure_positions))
        rows.extend(measure(args.measure_items, args.dim, world, args.measure_positions, args.port))
    print_table(rows, ["source", "items", "world", "positions", "rank", "params_gib", "grads_gib", "adamw_gib",
                       "loss_peak_gib", "total_gib", "peak_rss_gib", "ddp_total_gib"])
    conditions = {"dtype": "float32", "dim": args.dim, "positions_per_step": args.positions,
                  "measured_positions_per_step": args.measure_positions,
                  "optimizer": "AdamW (exp_avg + exp_avg_sq)", "measured_on": "CPU processes, gloo, one thread each",
                  "loss": "full softmax, distributed logsumexp (models/sharded_items.py)",
                  "ddp_total": "unsharded DDP per rank: whole table x 4 + (positions / world) x V logits x 2 "
                               "+ output table"}
    write_result(args.out or result_path("sharded_items_memory"), "sharded_items_memory", conditions, {"rows": rows})


# ---- throughput -------------------------------------------------------------------------------------------


def industrial_batch(rows: int, history: int, items: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random full histories as training rows: every position predicts the next item."""
    from models.data import time_gap_bucket_array

    ids = rng.integers(1, items + 1, size=(rows, history + 1))
    times = 1_700_000_000 + np.cumsum(rng.integers(1, 20_000, size=(rows, history + 1)), axis=1)
    ratings = rng.integers(0, 11, size=(rows, history + 1))
    gaps = time_gap_bucket_array(np.diff(times, axis=1, prepend=times[:, :1]))
    return {"ids": ids[:, :-1], "times": times[:, :-1], "query_times": times[:, 1:], "ratings": ratings[:, :-1],
            "gaps": gaps[:, :-1], "query_gaps": gaps[:, 1:], "lengths": np.full(rows, history),
            "targets": ids[:, 1:], "target_ratings": ratings[:, 1:], "users": np.arange(rows),
            "long_ids": np.zeros((rows, 0), np.int64), "long_times": np.zeros((rows, 0), np.int64),
            "row_index": np.arange(rows)}


def _industrial(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any], None]:
    from models.train_config import TrainConfig
    from models.ugt.model import UGT, UGTConfig

    items, history = args.items, args.history
    mc = {"num_items": items, "d_model": 256, "num_layers": 8, "num_heads": 4, "dqk": 64, "dv": 64, "dropout": 0.1,
          "embedding": {"item_repr": "id", "use_genres": False, "use_year": False},
          "multiscale": {"recent_len": history, "long_groups": 0},
          "moe": {"d_ff": 256, "num_experts": 4, "top_k": 2}, "heads": {"semantic_id": False}}
    model = UGT(UGTConfig.from_dict(mc))
    cfg = TrainConfig(model="ugt", num_negatives=128, temperature=0.05, batch_size=args.industrial_batch,
                      max_len=history, lr=1e-3)
    rng = np.random.default_rng(0)
    pool = [industrial_batch(args.industrial_batch, history, items, rng) for _ in range(4)]
    return model, cfg, (pool[i % len(pool)] for i in range(10**9)), {
        "model": "8 layers, d 256, 4 heads x 64, MoE 4 x 256 top-2, items by ID", "items": items,
        "history": history, "batch_rows": args.industrial_batch, "loss": "sampled softmax, 128 negatives"}, None


def _ml1m(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any], Any]:
    from models.checkpoint import build_model, load_data
    from models.data import iterate_batches
    from models.semantic_stage import semantic_codes
    from models.train import make_splits
    from models.train_config import load_config

    repo = Path(__file__).resolve().parent.parent
    artifact = repo / ".ugtdata" / "sid" / "ml1m"
    sets: dict[str, Any] = {"progress": False, "dpo": {"enabled": False}}
    if artifact.exists():
        sets["semantic_ids"] = {"artifact": str(artifact)}
    else:  # stage 1 takes minutes: items by ID alone, no semantic-ID head or contrastive loss
        sets.update({"semantic_ids": {}, "contrastive_weight": 0.0, "model_config.embedding.item_repr": "id",
                     "model_config.heads.semantic_id": False})
    cfg = load_config(str(repo / "models/configs/ugt_ml1m.yaml"), sets)
    data = load_data(cfg)
    codes, sizes = semantic_codes(cfg, data) if artifact.exists() else (None, [])
    model = build_model(cfg, data, codes, sizes)
    split = make_splits(cfg, data)["train"]
    rng = np.random.default_rng(cfg.seed)

    def batches():
        while True:
            yield from iterate_batches(split, cfg.batch_size, shuffle=True, rng=rng)

    info = {"config_file": "models/configs/ugt_ml1m.yaml", "semantic_ids": artifact.exists(), "items": data.num_items,
            "batch_rows": cfg.batch_size, "train_rows": len(split), "loss": "full softmax (num_negatives 0)"}
    return model, cfg, batches(), info, codes


def time_steps(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Samples/s of stage-2 steps for one config, after warm-up, for ``args.minutes``."""
    from models.eval import batch_to_device
    from models.train_loss import StepLoss

    model, cfg, batches, info, codes = _ml1m(args) if name == "ml1m" else _industrial(args)
    model.to(device).train()
    amp = device.type == "cuda"
    codes_t = torch.as_tensor(codes, device=device) if codes is not None else None
    step_loss = StepLoss(model, cfg, codes_t, amp, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    rows = positions = steps = 0
    started = None
    deadline = math.inf
    for i, np_batch in enumerate(batches):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, deadline = time.perf_counter(), time.perf_counter() + args.minutes * 60
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        batch = batch_to_device(np_batch, device)
        optimizer.zero_grad(set_to_none=True)
        step_loss(batch).backward()
        optimizer.step()
        if started is not None:
            rows += len(np_batch["lengths"])
            positions += int((np_batch["targets"] > 0).sum())
            steps += 1
        if time.perf_counter() > deadline or steps >= args.max_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"config": name, **info, "steps": steps, "seconds": seconds, "samples_per_s": rows / seconds,
            "positions_per_s": positions / seconds, "parameters": sum(p.numel() for p in model.parameters()),
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None}


def run_throughput(args: argparse.Namespace) -> None:
    from models.train_config import pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    rows = []
    for name in args.configs.split(","):
        print(f"timing {name} on {device} ...", flush=True)
        rows.append(time_steps(name, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["config", "items", "batch_rows", "steps", "seconds", "samples_per_s", "positions_per_s",
                       "peak_gpu_gib"])
    conditions = {"device": str(device), "processes": 1, "bf16_autocast": device.type == "cuda",
                  "compile": False, "warmup_steps": args.warmup, "minutes": args.minutes,
                  "step": "stage-2 loss (models/train_loss.StepLoss) forward + backward + AdamW, no evaluation"}
    write_result(args.out or result_path("train_throughput"), "train_throughput", conditions, {"rows": rows})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory", help="memory per rank of the sharded item table (CPU)")
    m.add_argument("--dim", type=int, default=256)
    m.add_argument("--positions", type=int, default=1024, help="supervised positions per step, all ranks")
    m.add_argument("--measure-items", type=int, default=1_000_000)
    m.add_argument("--measure-positions", type=int, default=128, help="positions per step of the measured runs")
    m.add_argument("--measure-worlds", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2])
    m.add_argument("--port", type=int, default=29535, help="gloo rendezvous port of the measured runs")
    m.add_argument("--out", type=Path, default=None)
    t = sub.add_parser("throughput", help="single-process training samples/s: ML-1M and industrial")
    t.add_argument("--device", default="cuda")
    t.add_argument("--configs", default="ml1m,industrial", help="comma list of ml1m, industrial")
    t.add_argument("--minutes", type=float, default=0.6, help="timed minutes per config")
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--max-steps", type=int, default=10**9)
    t.add_argument("--items", type=int, default=1_000_000, help="industrial catalog")
    t.add_argument("--history", type=int, default=1024, help="industrial history length")
    t.add_argument("--industrial-batch", type=int, default=16, help="industrial rows per step")
    t.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    run_memory(args) if args.what == "memory" else run_throughput(args)


if __name__ == "__main__":
    main()
