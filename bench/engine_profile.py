"""Where a GPU engine step's time goes: the worker's share (rows) and the engine's (one batch through the model).

A diagnosis tool for docs/SERVING.md, not a benchmark (it writes no result file): the trained ML-1M UGT on the
GPU, its KV cache warmed on the seen users, then batches of ``--batch`` requests with the e2e bench's traffic mix
(bench/e2e_load.py), each split into what an ``engine_scope: model`` worker does (``UGTGenerator.gather`` and
the packing) and what the engine does (``submit_packed`` and the top-k back), with cProfile over the engine's part.

  python -m bench.engine_profile --checkpoint ckpt.pt --batches 200
  python -m bench.engine_profile --size industrial --users 200000 --warm-users 5000 --kernels
      # the random-weight industrial UGT (bench/e2e_industrial.py); --kernels: torch.profiler's table of the
      # engine's share by GPU time per op (which kernels a batch spends its GPU time in)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np

from bench.e2e_generator import state_view
from bench.e2e_load import APPEND, make_schedule
from bench.e2e_users import ml1m_users


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="the trained ML-1M UGT (--size ml1m)")
    p.add_argument("--size", choices=["ml1m", "industrial"], default="ml1m")
    p.add_argument("--users", type=int, default=200_000, help="industrial: synthetic users")
    p.add_argument("--history-hop", type=int, default=0, help="the serving key history_hop")
    p.add_argument("--rank-top", type=int, default=-1,
                   help="the serving key rank_top (-1: the checkpoint's; the industrial one has a ranking head)")
    p.add_argument("--smoke", action="store_true", help="industrial: the e2e bench's smoke size (a CPU check)")
    p.add_argument("--kernels", action="store_true", help="torch.profiler over the measured batches: ops by GPU time")
    p.add_argument("--paged-attention", action="store_true",
                   help="the cached steps read the KV pool in place (InferenceConfig.paged_attention)")
    p.add_argument("--eager", action="store_true",
                   help="no CUDA graphs: slower, but --kernels then names the PyTorch ops, not only the kernels")
    p.add_argument("--clones", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--warm-users", type=int, default=60_000)
    p.add_argument("--mix", default="0.1,0.2,0.7", help="miss,hit,append shares")
    p.add_argument("--device", default="cuda")
    p.add_argument("--top", type=int, default=30, help="functions listed by own time")
    p.add_argument("--profile", choices=["engine", "worker"], default="engine", help="whose share cProfile watches")
    args = p.parse_args(argv)
    if args.size == "ml1m" and not args.checkpoint:
        p.error("--size ml1m needs --checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from serving.generator import GenerationRequest
    from serving.ugt_generator import UGTGenerator

    if args.size == "ml1m":
        users = ml1m_users(Path(args.checkpoint), args.clones, 64, 0)
    else:
        users = industrial(args)
    gen = UGTGenerator(args.checkpoint, kv_cache_users=len(users.ids), kv_cache_bytes=48 << 30, live_items=0,
                       device=args.device, max_batch=args.batch, history_hop=args.history_hop, rank_top=args.rank_top,
                       paged_attention=args.paged_attention)
    if args.eager:  # every step eager (and unpadded) from the first batch on
        gen.engine.dispatcher.enabled = gen.engine.graphs_on = False

    def batch_of(schedule, lo: int, hi: int) -> list:
        out = []
        for r in range(lo, hi):
            u = int(schedule.users[r])
            view = state_view(users.append_row(u) if schedule.classes[r] == APPEND else users.row(u))
            out.append(GenerationRequest(view, 10, frozenset(view.item_ids), "movie"))
        return out

    warm = make_schedule(1e5, args.warm_users / 1e5, (1.0, 0.0, 0.0), 0, len(users.ids), seed=999, popular_last=True)
    for lo in range(0, len(warm.times), args.batch):
        gen.recommend_batch(batch_of(warm, lo, min(lo + args.batch, len(warm.times))))
    users.seen = warm.seen_after
    mix = tuple(float(x) for x in args.mix.split(","))
    # Poisson arrivals: ask for a tenth more than the batches take, so a short draw still fills them
    schedule = make_schedule(1e5, 1.1 * args.batch * args.batches / 1e5, mix, users.seen, len(users.ids), seed=1)
    prof = cProfile.Profile()
    kernels = kernel_profiler(args)  # over every measured batch; the worker's share adds only CPU ops
    worker_s = engine_s = 0.0
    before = dict(gen.engine.cache.stats())
    for b in range(args.batches):
        requests = batch_of(schedule, b * args.batch, (b + 1) * args.batch)
        t0 = time.perf_counter()
        if args.profile == "worker":
            prof.enable()
        batch = gen.gather(requests)
        vectors, excl = gen.engine.row_vectors(batch.rows), gen.engine.exclusion_matrix(batch.excludes)
        t1 = time.perf_counter()
        prof.disable()
        if args.profile == "engine":
            prof.enable()
        gen.engine.submit_packed(vectors, excl, batch.k, batch.keys, batch.prints).arrays()
        prof.disable()
        worker_s += t1 - t0
        engine_s += time.perf_counter() - t1
    after = gen.engine.cache.stats()
    n = args.batch * args.batches
    print(f"{args.batches} batches of {args.batch} on {args.device}: cache "
          f"{ {k: after[k] - before.get(k, 0) for k in after} }")
    print(f"worker share (gather + pack): {1e6 * worker_s / n:.1f} us/request; "
          f"engine share (submit_packed + top-k): {1e3 * engine_s / args.batches:.2f} ms/batch = "
          f"{1e6 * engine_s / n:.1f} us/request -> one engine thread ~{n / engine_s:,.0f} req/s")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    print(f"rows per request: {np.mean([len(r['ids'][0]) for r in batch.rows]):.0f} columns")
    if kernels is not None:
        kernels.stop()
        on = "cuda" if args.device == "cuda" else "cpu"
        table = kernels.key_averages()
        print(table.table(sort_by=f"{on}_time_total", row_limit=args.top))  # steps (step:<kind>) and ops, inclusive
        print(table.table(sort_by=f"self_{on}_time_total", row_limit=args.top))  # kernels by their own time
    return 0


def industrial(args: argparse.Namespace):
    """The e2e bench's industrial users over its random-weight checkpoint (written to a temporary folder)."""
    import tempfile
    from pathlib import Path

    from bench.e2e_industrial import SIZES, item_name, write_industrial_checkpoint
    from bench.e2e_users import synthetic_users

    size = SIZES["smoke" if args.smoke else "industrial"]
    folder = Path(tempfile.mkdtemp(prefix="ugt-engine-profile-"))
    args.checkpoint = str(write_industrial_checkpoint(folder / "checkpoint.pt", size["items"], size["layers"],
                                                      size["dim"], size["history"]))
    names = np.asarray([item_name(i) for i in range(size["items"])], dtype=object)
    room = 16 if args.smoke else 64
    return synthetic_users(args.users, names, size["history"], size["history"] - room, room, 0)


def kernel_profiler(args: argparse.Namespace):
    """With --kernels: a started torch.profiler (CPU, and CUDA on a GPU), else None."""
    if not args.kernels:
        return None
    import torch.profiler as tp

    activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if args.device == "cuda" else [])
    profiler = tp.profile(activities=activities)
    profiler.start()
    return profiler


if __name__ == "__main__":
    raise SystemExit(main())
