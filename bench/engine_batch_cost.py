"""What one UGTGenerator.recommend_batch costs on this CPU, by batch size and by KV-cache misses in the batch.

The CPU serving bench (bench/serving.py) shows a per-batch model cost that is mostly fixed; this measures it
alone, in one process on one thread, with the small model the serving bench uses. Rows:
  hits B     every user's prefix cached: only the last event runs through the layers
  misses M/B M users of the batch have a changed history: their whole sequence runs again (prefill)
The eager rows are the anchor; --compile adds the same cases with the serving option ``torch_compile``
(InferenceConfig.compile: prefill and decode under torch.compile, compiled at start; its start-up time is
reported as compile_s), in the same run.

  python -m bench.engine_batch_cost               # writes bench/results/engine_batch_cost.json
  python -m bench.engine_batch_cost --compile     # + torch_compile rows (about a minute of compiling)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from bench.common import print_table, result_path, write_result
from bench.serving import DOMAIN, ensure_checkpoint

PROG = "python -m bench.engine_batch_cost"
HISTORY = 50
USERS = 512
REPEATS = 5


def states(vocab: list[str], users: int, seed: int, extra: int = 0) -> list[Any]:
    """Users with HISTORY events each; ``extra`` > 0 replaces the last event (a changed history)."""
    from contracts.user_state_rule import STATE_VERSION
    from serving.user_state_reader import UserStateView

    rng = np.random.default_rng(seed)
    times = tuple(1_700_000_000_000 + i * 60_000 for i in range(HISTORY))
    out = []
    for u in range(users):
        items = tuple(str(i) for i in rng.choice(vocab, HISTORY))
        if extra:
            items = items[:-1] + (vocab[(u + extra) % len(vocab)],)
        out.append(UserStateView(f"cost-{u}", items, (2,) * HISTORY, (8,) * HISTORY, times, HISTORY, times[-1],
                                 STATE_VERSION))
    return out


def batch_ms(gen: Any, base: list[Any], size: int, misses: int) -> float:
    """Best of REPEATS: ms per batch of ``size``, the first ``misses`` users of each batch with a changed history."""
    from serving.generator import GenerationRequest

    vocab = list(gen.item_to_index)

    def request(state: Any) -> Any:
        return GenerationRequest(state, 10, frozenset(state.item_ids), DOMAIN)

    best = float("inf")
    for rep in range(REPEATS):
        changed = states(vocab, USERS, seed=0, extra=rep + 1) if misses else []
        batches = []
        for start in range(0, USERS - size + 1, size):
            batch = [request(s) for s in base[start : start + size]]
            for j in range(misses):
                batch[j] = request(changed[start + j])
            batches.append(batch)
        began = time.perf_counter()
        for batch in batches:
            gen.recommend_batch(batch)
        best = min(best, (time.perf_counter() - began) / len(batches) * 1000.0)
        if misses:  # put the cached prefixes back for the next repeat
            for start in range(0, USERS, 64):
                gen.recommend_batch([request(s) for s in base[start : start + 64]])
    return round(best, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--compile", action="store_true",
                        help="also time every case with torch_compile on (the serving option)")
    args = parser.parse_args(argv)

    from infra.settings import get_settings
    from serving.generator import GenerationRequest
    from serving.ugt_generator import UGTGenerator

    torch.set_num_threads(1)
    checkpoint = ensure_checkpoint(get_settings().cache_dir)
    cases = [(1, 0), (8, 0), (16, 0), (64, 0), (1, 1), (8, 1), (8, 2), (8, 8)]
    variants = [("eager", False)] + ([("torch_compile", True)] if args.compile else [])
    conditions = {"threads": 1, "model": "ugt_ml100k_tiny (bench.serving.ensure_checkpoint)", "history": HISTORY,
                  "users": USERS, "repeats": REPEATS,
                  "anchor": "eager rows; --compile adds the same cases with torch_compile, same run"}
    payload: dict[str, Any] = {}
    rows = []
    for variant, compiled in variants:
        began = time.perf_counter()
        gen = UGTGenerator(checkpoint, kv_cache_users=USERS, compile_cpu=compiled)
        if compiled:  # start-up: load + compile (inductor's disk cache, if warm from an earlier run, shortens it)
            payload["compile_s"] = round(time.perf_counter() - began, 1)
        base = states(list(gen.item_to_index), USERS, seed=0)
        for start in range(0, USERS, 64):  # fill the caches
            gen.recommend_batch([GenerationRequest(s, 10, frozenset(s.item_ids), DOMAIN)
                                 for s in base[start : start + 64]])
        rows += [{"variant": variant, "batch": b, "misses": m, "ms_per_batch": batch_ms(gen, base, b, m)}
                 for b, m in cases]
    payload["rows"] = rows
    print_table(rows)
    write_result(result_path("engine_batch_cost"), "engine_batch_cost", conditions, payload, argv, PROG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
